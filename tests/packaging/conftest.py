"""Packaging fixtures: the .deb and .rpm built once per session by the same scripts as
`make deb` / `make rpm` (into a temp dir, not dist/), and helpers to run system tools."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def run(cmd, *, check=True, timeout=300, env=None, **kwargs) -> subprocess.CompletedProcess:
    """Run a system tool with the system PATH only (no venv, no pyenv, no FLANNELD_*)."""
    environ = {"PATH": SYSTEM_PATH, "LC_ALL": "C.UTF-8", **(env or {})}
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=environ,
        **kwargs,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n, path=SYSTEM_PATH) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/install-deps.sh --packaging installs them)")


def _build(script: str, pattern: str, tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    run([REPO / "scripts" / script], env={"DIST_DIR": str(dist)}, timeout=600)
    found = sorted(dist.glob(pattern))
    assert len(found) == 1, f"{script} should leave exactly one {pattern} in {dist}: {found}"
    return found[0]


@pytest.fixture(scope="session")
def built_deb(tmp_path_factory) -> Path:
    require_tools("dpkg-buildpackage", "dh", "pybuild", "dpkg-parsechangelog")
    return _build("build-deb.sh", "flanneld_*.deb", tmp_path_factory)


@pytest.fixture(scope="session")
def built_rpm(tmp_path_factory) -> Path:
    require_tools("rpmbuild", "rpm")
    return _build("build-rpm.sh", "flanneld-*.rpm", tmp_path_factory)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("installs the package with apt-get/dpkg: needs root")
