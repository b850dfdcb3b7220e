"""Checks of the packaging sources that need no build: versions agree, shell scripts are
shellcheck-clean, the man page documents every flag, the unit files and options.env say
what the issue asks for."""

import configparser
import re

import pytest

from flannel import __version__
from flannel.options import ENV_PREFIX, FLAGS
from tests.packaging.conftest import PACKAGING, REPO, require_tools, run

SHELL_SCRIPTS = [
    PACKAGING / "mk-docker-opts.sh",
    PACKAGING / "deb" / "debian" / "flanneld.init",
    PACKAGING / "deb" / "debian" / "flanneld.prerm",
    PACKAGING / "deb" / "debian" / "flanneld.postrm",
    REPO / "scripts" / "build-deb.sh",
    REPO / "scripts" / "build-rpm.sh",
    REPO / "scripts" / "packaging-lib.sh",
]
# Go's logging flags are accepted and ignored: documented in the man page, not in options.env
GLOG_FLAGS = {"logtostderr", "alsologtostderr", "log_dir", "stderrthreshold", "vmodule",
              "log_backtrace_at"}


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(PACKAGING / "systemd" / name)
    return parser


def test_changelog_spec_and_man_page_carry_the_project_version():
    require_tools("dpkg-parsechangelog")
    changelog = run(["dpkg-parsechangelog", "-l", PACKAGING / "deb/debian/changelog",
                     "-S", "Version"]).stdout.strip()
    spec = (PACKAGING / "rpm" / "flanneld.spec").read_text()
    man = (PACKAGING / "flanneld.8").read_text()
    assert changelog == __version__
    assert re.search(rf"^Version:\s+{re.escape(__version__)}$", spec, re.M)
    assert re.search(rf"^\* .* - {re.escape(__version__)}-1$", spec, re.M), "spec %changelog entry"
    assert f'"flannel-py {__version__}"' in man.splitlines()[0]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_are_shellcheck_clean(script):
    require_tools("shellcheck")
    dialect = "sh" if script.suffix in (".init", ".prerm", ".postrm") else "bash"
    proc = run(["shellcheck", "-x", "-s", dialect, script],
               check=False, cwd=script.parent)
    assert proc.returncode == 0, proc.stdout


def test_man_page_documents_every_flag():
    require_tools("man")
    text = (PACKAGING / "flanneld.8").read_text().replace("\\-", "-")
    names = [f.name for f in FLAGS] + ["config-file", "version", "help"]
    missing = [n for n in names if f"--{n}" not in text]
    assert not missing, f"flags missing from packaging/flanneld.8: {missing}"
    proc = run(["man", "--warnings", "-l", PACKAGING / "flanneld.8"], env={"MANPAGER": "cat"})
    assert "FLANNELD(8)" in proc.stdout
    assert proc.stderr == "", f"groff warnings: {proc.stderr}"


def test_options_env_example_names_every_option_and_nothing_else():
    text = (PACKAGING / "options.env").read_text()
    for line in text.splitlines():
        assert line == "" or line.startswith("#"), f"options.env must set nothing: {line!r}"
    shown = set(re.findall(rf"^#({ENV_PREFIX}[A-Z_]+)=", text, re.M))
    known = {ENV_PREFIX + f.name.upper().replace("-", "_") for f in FLAGS}
    assert shown <= known, f"unknown keys in options.env: {shown - known}"
    wanted = {ENV_PREFIX + f.name.upper().replace("-", "_") for f in FLAGS
              if f.name not in GLOG_FLAGS | {"kube-subnet-mgr"}}
    assert wanted <= shown, f"options missing from options.env: {wanted - shown}"


def test_flanneld_service_is_a_notify_service_before_docker():
    svc = unit("flanneld.service")
    assert svc["Service"]["Type"] == "notify"
    assert svc["Service"]["EnvironmentFile"] == "-/etc/flannel/options.env"
    assert svc["Service"]["Restart"] == "on-failure"
    assert svc["Service"]["ExecStart"] == "/usr/bin/flanneld"
    assert "network-online.target" in svc["Unit"]["After"].split()
    assert "network-online.target" in svc["Unit"]["Wants"].split()
    assert "docker.service" in svc["Unit"]["Before"].split()
    assert svc["Install"]["WantedBy"] == "multi-user.target"


def test_server_units_use_socket_activation():
    sock, svc = unit("flanneld-server.socket"), unit("flanneld-server.service")
    assert sock["Socket"]["ListenStream"] == "8888"
    assert svc["Service"]["ExecStart"] == "/usr/bin/flanneld --listen=fd://"
    assert svc["Service"]["Type"] == "notify"
    assert svc["Service"]["EnvironmentFile"] == "-/etc/flannel/options.env"
    assert "flanneld-server.socket" in svc["Unit"]["Requires"].split()
