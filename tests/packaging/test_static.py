"""Checks of the packaging sources that need no build: versions agree, shell scripts are
shellcheck-clean, the man page documents every flag, the unit files and the example options
files (options.env, server.env) say what the issue asks for."""

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
# What the client/server mode's server uses (flannel/__main__.py, run_server): etcd, its own
# TLS (the --remote-* files), the log level.
SERVER_FLAGS = {"etcd-endpoints", "etcd-prefix", "etcd-keyfile", "etcd-certfile", "etcd-cafile",
                "etcd-username", "etcd-password", "remote-keyfile", "remote-certfile",
                "remote-cafile", "verbose"}


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


def env_key(flag_name: str) -> str:
    return ENV_PREFIX + flag_name.upper().replace("-", "_")


def example_keys(name: str) -> set:
    """The FLANNELD_* keys an example options file shows, each commented out."""
    text = (PACKAGING / name).read_text()
    for line in text.splitlines():
        assert line == "" or line.startswith("#"), f"{name} must set nothing: {line!r}"
    shown = set(re.findall(rf"^#({ENV_PREFIX}[A-Z_]+)=", text, re.M))
    known = {env_key(f.name) for f in FLAGS}
    assert shown <= known, f"unknown keys in {name}: {shown - known}"
    return shown


def test_options_env_example_names_every_daemon_option_and_nothing_else():
    """options.env configures flanneld.service and the init script: every option but the
    server's --listen, which would turn that daemon into a server (the server has server.env)."""
    shown = example_keys("options.env")
    wanted = {env_key(f.name) for f in FLAGS
              if f.name not in GLOG_FLAGS | {"kube-subnet-mgr", "listen"}}
    assert wanted <= shown, f"options missing from options.env: {wanted - shown}"
    assert env_key("listen") not in shown


def test_server_env_example_names_every_server_option_and_nothing_else():
    """server.env configures flanneld-server.service: exactly what the server uses. Not
    --listen (the socket comes from flanneld-server.socket), not --remote (refused with
    --listen), nothing of the network mode."""
    assert example_keys("server.env") == {env_key(name) for name in SERVER_FLAGS}


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
    # its own options file: options.env may make this host a client (--remote)
    assert svc["Service"]["ExecStart"] == (
        "/usr/bin/flanneld --config-file=/etc/flannel/server.env --listen=fd://")
    assert svc["Service"]["Type"] == "notify"
    assert svc["Service"]["EnvironmentFile"] == "-/etc/flannel/server.env"
    assert "flanneld-server.socket" in svc["Unit"]["Requires"].split()
