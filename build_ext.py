"""cffi out-of-line API-mode builder of flannel._proxy, the udp backend's C packet loop.

The C lives in real files: csrc/proxy.h is both the cdef and the public header; proxy.c
(commands, loop), datapath.c (batched I/O), packet.c (IPv4 checks, ICMP) and rtable.c
(routes) implement it. setup.py uses `ffibuilder` (cffi_modules); running this file builds the
extension in place (flannel/_proxy*.so) for development: `python build_ext.py`.
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "csrc" / "proxy.h").read_text())
ffibuilder.set_source(
    "flannel._proxy",
    '#include <stdint.h>\n#include "proxy.h"\n',
    # relative paths: setuptools builds from the project root, and so does __main__ below
    sources=["csrc/proxy.c", "csrc/datapath.c", "csrc/packet.c", "csrc/rtable.c"],
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11", "-D_GNU_SOURCE"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    # build next to the package sources so that `import flannel._proxy` works from the repo
    os.chdir(HERE)
    ffibuilder.compile(tmpdir=".", verbose=True)
