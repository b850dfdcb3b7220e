"""Build and install flanneld; the C hot loop is compiled by cffi from build_ext.py."""

import os
import sys

from setuptools import find_packages, setup

# PEP 517 builds (pip, python -m build, Debian's pybuild) do not put the project on sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flannel import __version__  # noqa: E402

setup(
    name="flannel-py",
    version=__version__,
    description="flanneld overlay-network daemon, compatible with Go flanneld",
    packages=find_packages(include=["flannel", "flannel.*"]),
    python_requires=">=3.11",
    setup_requires=["cffi>=1.15"],
    cffi_modules=["build_ext.py:ffibuilder"],
    install_requires=[
        "cffi>=1.15",
        "python-etcd>=0.4.5",
        "pyroute2>=0.7",
        "werkzeug>=2.2",
        "requests>=2.28",
        "configargparse>=1.5",
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "trustme>=1.0"]},
    entry_points={"console_scripts": ["flanneld = flannel.__main__:main"]},
)
