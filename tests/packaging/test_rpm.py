"""The .rpm built by scripts/build-rpm.sh (rpmbuild from Debian's `rpm` package), checked with
rpm's query options: version, file list, modes, config files, dependencies, scriptlets."""

import pytest

from flannel import __version__
from tests.packaging.conftest import run

UNITS = ["flanneld.service", "flanneld-server.service", "flanneld-server.socket"]


def query(rpm, *args) -> str:
    return run(["rpm", "-qp", *args, rpm]).stdout


def test_rpm_version_and_arch(built_rpm):
    assert query(built_rpm, "--qf", "%{NAME} %{VERSION} %{ARCH}") == f"flanneld {__version__} x86_64"


def test_rpm_file_list(built_rpm):
    files = query(built_rpm, "-l").splitlines()
    expected = ["/usr/bin/flanneld", "/etc/flannel/options.env", "/etc/flannel/server.env",
                "/usr/libexec/flannel/mk-docker-opts.sh"]
    expected += [f"/usr/lib/systemd/system/{unit}" for unit in UNITS]
    for path in expected:
        assert path in files, f"{path} not in the rpm"
    assert any(p.startswith("/usr/share/man/man8/flanneld.8") for p in files)
    modules = [p for p in files if "-packages/flannel/" in p]
    assert any(p.endswith("/flannel/__main__.py") for p in modules)
    assert any("/flannel/_proxy" in p and p.endswith(".so") for p in modules)
    assert not [p for p in files if "/tests/" in p or p.startswith("/usr/local")]


def test_rpm_options_files_are_private_noreplace_config_files(built_rpm):
    config = ["/etc/flannel/options.env", "/etc/flannel/server.env"]
    assert sorted(query(built_rpm, "-c").splitlines()) == config
    fmt = "[%{FILENAMES} %{FILEMODES:perms} %{FILEFLAGS:fflags}\\n]"
    for path in config:
        line = [x for x in query(built_rpm, "--qf", fmt).splitlines() if x.startswith(path)][0]
        _, perms, flags = line.split()
        assert perms == "-rw-------", f"{path} may hold the etcd password"
        assert "c" in flags and "n" in flags, f"{path}: config(noreplace) flags missing: {flags}"


def test_rpm_requires_the_runtime_dependencies(built_rpm):
    requires = query(built_rpm, "-R")
    for dep in ("python3dist(cffi)", "python3dist(python-etcd)", "python3dist(pyroute2)",
                "python3dist(werkzeug)", "python3dist(requests)", "python3dist(configargparse)",
                "iproute", "iptables"):
        assert dep in requires, f"missing Requires: {dep}"


@pytest.mark.parametrize("scriptlet, action", [
    ("postinstall", "preset"),
    ("preuninstall", "disable --now"),
    ("postuninstall", "try-restart"),
])
def test_rpm_scriptlets_manage_the_units(built_rpm, scriptlet, action):
    scripts = query(built_rpm, "--scripts")
    sections, current = {}, None
    for line in scripts.splitlines():
        if " scriptlet (using " in line:
            current = line.split()[0]
            sections[current] = ""
        elif current:
            sections[current] += line + "\n"
    body = sections.get(scriptlet, "")
    assert action in body or "systemd-update-helper" in body, f"{scriptlet}:\n{body}"
    for unit in UNITS:
        assert unit in body, f"{unit} not handled in {scriptlet}"


def test_rpm_changelog_names_the_version(built_rpm):
    assert f"- {__version__}-1" in query(built_rpm, "--changelog").splitlines()[0]
