"""cffi out-of-line API-mode builder of flannel._proxy, the udp backend's C packet loop.

The C lives in real files: csrc/proxy.h is both the cdef and the header, csrc/proxy.c the
implementation. setup.py uses `ffibuilder` (cffi_modules); running this file builds the
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
    sources=["csrc/proxy.c"],
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    # build next to the package sources so that `import flannel._proxy` works from the repo
    os.chdir(HERE)
    ffibuilder.compile(tmpdir=".", verbose=True)
