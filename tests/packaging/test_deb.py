"""The .deb as an administrator meets it: built by scripts/build-deb.sh, lintian-clean,
installed with apt-get, then the installed flanneld, units, init script and mk-docker-opts.sh
are used for real (the daemon against a test etcd on loopback with the alloc backend, its
options from the installed /etc/flannel/options.env). Removal stops the daemon and keeps the
config files, purge removes everything. The tests of this module run in order and share one
installation."""

from __future__ import annotations

import configparser
import json
import os
import glob
import shlex
import signal
import stat
import subprocess
import time
import urllib.request
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from flannel import __version__
from tests.packaging.conftest import SYSTEM_PATH, require_root, require_tools, run
from tests.integration.conftest import etcd  # noqa: F401  (the module-scoped etcd fixture)
from tests.support.etcd import free_port

PKG = "flanneld"
OPTIONS = Path("/etc/flannel/options.env")
SERVER_ENV = Path("/etc/flannel/server.env")
INIT = "/etc/init.d/flanneld"
PIDFILE = Path("/run/flanneld.pid")
LOGFILE = Path("/var/log/flanneld.log")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
UNITS = ["flanneld.service", "flanneld-server.service", "flanneld-server.socket"]
NETWORK = IPv4Network("10.77.0.0/16")
PREFIX = f"/test-packaging-{os.getpid()}/network"
# Everything the package installs outside its Python modules and docs.
PROGRAM_FILES = [
    "/usr/bin/flanneld",
    "/usr/libexec/flannel/mk-docker-opts.sh",
    "/usr/share/man/man8/flanneld.8.gz",
    "/lib/systemd/system/flanneld.service",
    "/lib/systemd/system/flanneld-server.service",
    "/lib/systemd/system/flanneld-server.socket",
    "/usr/lib/python3/dist-packages/flannel/__init__.py",
]
CONFFILES = [str(OPTIONS), str(SERVER_ENV), INIT]
ENABLED_LINK = "/etc/systemd/system/multi-user.target.wants/flanneld.service"

pytestmark = pytest.mark.needs_root


def dpkg_status(pkg: str = PKG) -> str:
    """'ii' installed, 'rc' removed with config files left, '' unknown to dpkg."""
    proc = run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", pkg], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def purge() -> None:
    """Stop a daemon the tests started and purge the package; never fails the teardown."""
    if PIDFILE.exists() and Path(INIT).exists():
        run([INIT, "stop"], check=False, timeout=60)
    if dpkg_status():
        run(["dpkg", "--purge", PKG], check=False, env={"DEBIAN_FRONTEND": "noninteractive"})


@pytest.fixture(scope="module")
def installed(built_deb):
    """The built .deb installed with apt-get for this module, purged afterwards."""
    require_root()
    require_tools("apt-get", "dpkg", "start-stop-daemon")
    if dpkg_status():
        pytest.skip(f"package {PKG} is already known to dpkg ({dpkg_status()}): not touching it")
    if any(p.exists() for p in (OPTIONS, SERVER_ENV, Path(INIT), PIDFILE)):
        pytest.skip(f"{OPTIONS}, {SERVER_ENV}, {INIT} or {PIDFILE} exists and was not installed "
                    "by this test")
    try:
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", built_deb],
            env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=600)
        yield built_deb
    finally:
        purge()


@pytest.fixture(scope="module")
def configured(installed, etcd, tmp_path_factory):
    """The installed options.env pointed at the test etcd; the network config written."""
    workdir = tmp_path_factory.mktemp("flanneld")
    subnet_file = workdir / "subnet.env"
    etcd.client().write(f"{PREFIX}/config", json.dumps(
        {"Network": str(NETWORK), "Backend": {"Type": "alloc"}}))
    OPTIONS.write_text(
        "# written by tests/packaging/test_deb.py\n"
        f"FLANNELD_ETCD_ENDPOINTS={etcd.endpoint}\n"
        f"FLANNELD_ETCD_PREFIX={PREFIX}\n"
        "FLANNELD_IFACE=127.0.0.1\n"
        # the alloc backend and no masquerading: nothing is changed in the root namespace
        "FLANNELD_IP_MASQ=false\n"
        f"FLANNELD_SUBNET_FILE={subnet_file}\n"
    )
    return {"subnet_file": subnet_file, "etcd": etcd}


def read_env(path: Path) -> dict:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}; {log_tail()}")


def log_tail() -> str:
    return f"{LOGFILE}:\n" + (LOGFILE.read_text()[-3000:] if LOGFILE.exists() else "(none)")


def daemon_pid() -> int:
    return int(PIDFILE.read_text().strip())


def running(pid: int) -> bool:
    """pid is a live process (not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def kill_left_over_daemon(pid: int) -> None:
    """A test's own daemon that the package failed to stop: killed, its pidfile removed."""
    try:
        ours = b"/usr/bin/flanneld" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        ours = False
    if ours and running(pid):
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not running(pid), 10, f"pid {pid} to exit")
    PIDFILE.unlink(missing_ok=True)


def allowing_service_actions(cmd: list, tmp_path: Path) -> list:
    """cmd, run so that maintainer scripts may stop services. Container images often carry a
    /usr/sbin/policy-rc.d that forbids every action (Docker's exits 101), and invoke-rc.d obeys
    it, as it must; cmd then sees a permissive one, bind-mounted over it in a mount namespace
    of its own, so that the host's file is never changed."""
    if not POLICY_RC_D.exists():
        return cmd
    require_tools("unshare", "mount")
    allow = tmp_path / "policy-rc.d"
    allow.write_text("#!/bin/sh\nexit 0\n")
    allow.chmod(0o755)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /usr/sbin/policy-rc.d && exec "$@"', allow, *cmd]


# The service tools maintainer scripts call, replaced by stubs that log their arguments.
SERVICE_TOOLS = ["deb-systemd-invoke", "deb-systemd-helper", "systemctl", "invoke-rc.d",
                 "update-rc.d", "py3compile", "py3clean"]


def maintainer_script_calls(deb: Path, script: str, args: list, tmp_path: Path) -> list:
    """The service-tool calls the maintainer script makes when dpkg runs it with args on a
    host where systemd is PID 1 (it is not on the test hosts): /run/systemd/system exists in
    a mount namespace of the script's own, the tools are stubs."""
    require_root()
    require_tools("unshare", "mount")
    control = tmp_path / "control"
    if not control.exists():
        run(["dpkg-deb", "-e", deb, control])
    stubs, log = tmp_path / "stubs", tmp_path / f"{script}-calls"
    stubs.mkdir(exist_ok=True)
    log.write_text("")
    for tool in SERVICE_TOOLS:
        stub = stubs / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >>"{log}"\n')
        stub.chmod(0o755)
    run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec sh "$@"', "sh",
         control / script, *args], env={"PATH": f"{stubs}:{SYSTEM_PATH}"})
    return log.read_text().splitlines()


def stopped_units(calls: list) -> set:
    return {word for call in calls
            if call.startswith(("deb-systemd-invoke stop", "systemctl stop"))
            for word in call.split()[2:] if not word.startswith("-")}


def test_lintian_finds_no_errors(built_deb):
    require_tools("lintian")
    proc = run(["lintian", "--allow-root", "--fail-on", "error", built_deb], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [line for line in proc.stdout.splitlines() if line.startswith("E:")]


def test_package_metadata(built_deb):
    fields = run(["dpkg-deb", "-f", built_deb, "Package", "Version", "Architecture",
                  "Depends"]).stdout
    assert f"Version: {__version__}\n" in fields
    assert "Architecture: all" not in fields, "the compiled _proxy module makes it arch-specific"
    for dep in ("python3-etcd", "python3-pyroute2", "python3-werkzeug", "python3-requests",
                "python3-configargparse", "iproute2", "iptables"):
        assert dep in fields
    assert "python3-cffi-backend" in fields


def test_installed_flanneld_prints_the_version(installed):
    proc = run(["/usr/bin/flanneld", "--version"])
    assert __version__ in proc.stdout
    assert Path("/usr/bin/flanneld").read_text().startswith("#!/usr/bin/python3")


def test_installed_files_and_modes(installed):
    listed = run(["dpkg", "-L", PKG]).stdout.splitlines()
    for path in PROGRAM_FILES + CONFFILES:
        assert path in listed, f"{path} not in the package"
        assert Path(path).exists(), path
    compiled = [p for p in listed if "/flannel/_proxy" in p and p.endswith(".so")]
    assert compiled, "compiled module flannel._proxy missing"
    for path in (OPTIONS, SERVER_ENV):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path} may hold the etcd password"
    for path in ("/usr/bin/flanneld", "/usr/libexec/flannel/mk-docker-opts.sh", INIT):
        assert os.access(path, os.X_OK), f"{path} is not executable"
    conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", PKG]).stdout
    for path in CONFFILES:
        assert f" {path} " in conffiles, f"{path} is not a conffile"


def test_daemon_is_enabled_for_boot_but_not_started_and_server_not_enabled(installed):
    assert os.path.islink(ENABLED_LINK), "flanneld.service enabled (systemd)"
    assert glob.glob("/etc/rc2.d/S??flanneld"), "init script enabled (SysV)"
    assert not glob.glob("/etc/systemd/system/*/flanneld-server.*")
    assert not PIDFILE.exists(), "installing must not start the daemon before it is configured"


def test_removal_stops_every_unit_under_systemd(built_deb, tmp_path):
    """What the prerm does under systemd (the init script's case is run for real below):
    removal stops every unit, an upgrade stops none of them here."""
    removal = maintainer_script_calls(built_deb, "prerm", ["remove"], tmp_path)
    assert stopped_units(removal) == set(UNITS), removal
    upgrade = maintainer_script_calls(built_deb, "prerm", ["upgrade", __version__], tmp_path)
    assert not stopped_units(upgrade), upgrade


def test_installing_does_not_start_the_daemon_under_systemd(built_deb, tmp_path):
    """The postinst of a first installation under systemd leaves flanneld.service stopped: it
    needs options.env first. (The server units may be named to deb-systemd-invoke, which
    starts only enabled units, and installing does not enable them: checked for real above.)"""
    calls = maintainer_script_calls(built_deb, "postinst", ["configure"], tmp_path)
    started = [c for c in calls if c.startswith(("deb-systemd-invoke start", "systemctl start"))]
    assert not [c for c in started if "flanneld.service" in c.split()], calls


def test_upgrade_restarts_what_runs_under_systemd(built_deb, tmp_path):
    """An upgrade under systemd leaves running what ran before, on the new code: nothing is
    stopped before the new files are unpacked, and every unit is restarted once they are
    (flanneld.service with try-restart, only if it ran; deb-systemd-invoke's restart leaves
    the server units alone unless they are enabled or running), as the rpm does."""
    preinst = maintainer_script_calls(built_deb, "preinst", ["upgrade", __version__], tmp_path)
    assert not stopped_units(preinst), preinst
    postinst = maintainer_script_calls(built_deb, "postinst", ["configure", __version__], tmp_path)
    restarted = {word for call in postinst
                 if call.startswith(("deb-systemd-invoke try-restart", "deb-systemd-invoke restart"))
                 for word in call.split()[2:]}
    assert restarted == set(UNITS), postinst


def test_installed_python_imports_the_compiled_module(installed):
    proc = run(["/usr/bin/python3", "-c",
                "import flannel, flannel._proxy; print(flannel.__file__, flannel._proxy.__file__)"],
               cwd="/")
    assert proc.stdout.startswith("/usr/lib/python3/dist-packages/flannel/")


def test_units_pass_systemd_analyze_verify(installed):
    require_tools("systemd-analyze")
    proc = run(["systemd-analyze", "verify", *[f"/lib/systemd/system/{u}" for u in UNITS]],
               check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "flanneld" in line]
    assert not ours, ours


def test_init_script_status_when_stopped(installed):
    proc = run([INIT, "status"], check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "not running" in proc.stdout + proc.stderr


def test_init_script_runs_the_daemon_with_options_env(configured):
    subnet_file, etcd = configured["subnet_file"], configured["etcd"]
    start = run([INIT, "start"], check=False, timeout=60)
    assert start.returncode == 0, start.stdout + start.stderr + log_tail()
    try:
        wait_for(lambda: subnet_file.exists() and "FLANNEL_SUBNET" in subnet_file.read_text(),
                 60, f"{subnet_file}")
        env = read_env(subnet_file)
        assert env["FLANNEL_NETWORK"] == str(NETWORK)
        subnet = IPv4Interface(env["FLANNEL_SUBNET"]).network
        assert subnet.subnet_of(NETWORK) and subnet.prefixlen == 24
        lease = etcd.client().read(f"{PREFIX}/subnets/{subnet.network_address}-24")
        assert json.loads(lease.value)["PublicIP"] == "127.0.0.1"

        pid = daemon_pid()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"/usr/bin/flanneld" in cmdline
        status = run([INIT, "status"], check=False)
        assert status.returncode == 0 and "is running" in status.stdout, status.stdout

        run([INIT, "restart"], timeout=90)
        assert daemon_pid() != pid
        wait_for(lambda: run([INIT, "status"], check=False).returncode == 0, 30, "restart")
        assert read_env(subnet_file)["FLANNEL_SUBNET"] == env["FLANNEL_SUBNET"]
        pid = daemon_pid()
    finally:
        run([INIT, "stop"], timeout=60)
    # stop returns only once the daemon has exited
    assert not Path(f"/proc/{pid}").exists()
    assert not PIDFILE.exists()
    assert run([INIT, "status"], check=False).returncode == 3


def test_mk_docker_opts_reads_the_daemons_subnet_file(configured, tmp_path):
    subnet_file = configured["subnet_file"]
    assert subnet_file.exists(), "written by the init script test"
    out = tmp_path / "docker"
    run(["/usr/libexec/flannel/mk-docker-opts.sh", "-f", subnet_file, "-d", out,
         "-k", "DOCKER_NETWORK_OPTIONS"])
    env = read_env(subnet_file)
    text = out.read_text()
    assert f'DOCKER_OPT_BIP="--bip={env["FLANNEL_SUBNET"]}"' in text
    assert f'--mtu={env["FLANNEL_MTU"]}' in text
    assert text.splitlines()[-1].startswith('DOCKER_NETWORK_OPTIONS=" --bip=')


def server_unit_command() -> tuple:
    """The installed flanneld-server.service's ExecStart, and the environment that its
    EnvironmentFile gives it."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read("/lib/systemd/system/flanneld-server.service")
    service = unit["Service"]
    env_file = Path(service["EnvironmentFile"].lstrip("-"))
    env = {}
    if env_file.exists():  # "-": a missing file is no error
        for line in env_file.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith(("#", ";")):
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip()
    return shlex.split(service["ExecStart"]), env


def serve_by_socket_activation(etcd) -> dict:
    """Run flanneld-server.service's command line as systemd would, under
    systemd-socket-activate (which passes a listening socket the way flanneld-server.socket
    does) with the unit's environment, and return the network config it answers."""
    require_tools("systemd-socket-activate")
    cmd, env = server_unit_command()
    port = free_port()
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
         *[arg for k, v in env.items() for arg in ("-E", f"{k}={v}")], *cmd],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    try:
        def fetch():
            if proc.poll() is not None:
                pytest.fail(f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr.read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/_/config", timeout=5) as r:
                    return json.loads(r.read())
            except OSError:
                return None

        return wait_for(fetch, 30, "the socket-activated server to answer")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def server_configured(configured):
    """server.env pointed at the test etcd, the package's template (or no file, if the package
    has none) put back afterwards."""
    template = SERVER_ENV.read_text() if SERVER_ENV.exists() else None
    etcd = configured["etcd"]
    SERVER_ENV.write_text((template or "") + f"FLANNELD_ETCD_ENDPOINTS={etcd.endpoint}\n"
                          f"FLANNELD_ETCD_PREFIX={PREFIX}\n")
    yield etcd
    if template is None:
        SERVER_ENV.unlink()
    else:
        SERVER_ENV.write_text(template)


def test_server_unit_command_serves_a_socket_passed_by_systemd(server_configured):
    """flanneld-server.service as installed, with its options in server.env."""
    config = serve_by_socket_activation(server_configured)
    assert config["Network"] == str(NETWORK)


def test_server_unit_runs_beside_a_client_configured_in_options_env(server_configured):
    """A host whose flanneld.service is a client (FLANNELD_REMOTE in options.env) can still run
    the server: the server's command line does not read options.env."""
    edited = OPTIONS.read_text()
    OPTIONS.write_text(edited + f"FLANNELD_REMOTE=127.0.0.1:{free_port()}\n")
    try:
        config = serve_by_socket_activation(server_configured)
    finally:
        OPTIONS.write_text(edited)
    assert config["Network"] == str(NETWORK)


def test_reinstall_keeps_the_edited_options_env(configured, built_deb):
    edited = OPTIONS.read_text()
    assert "FLANNELD_ETCD_PREFIX" in edited
    run(["dpkg", "-i", built_deb], env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=120)
    assert OPTIONS.read_text() == edited
    assert dpkg_status() == "ii"


def test_remove_keeps_config_files_and_purge_removes_them(configured):
    run(["dpkg", "-r", PKG], env={"DEBIAN_FRONTEND": "noninteractive"})
    assert dpkg_status() == "rc"
    for path in PROGRAM_FILES:
        assert not Path(path).exists(), f"{path} left after dpkg -r"
    assert "FLANNELD_ETCD_PREFIX" in OPTIONS.read_text(), "the administrator's options.env is kept"
    # the init script is a conffile too; with the program gone it must do nothing
    assert Path(INIT).exists()
    assert not os.access(INIT, os.X_OK) or run([INIT, "start"], check=False).returncode == 0
    assert not PIDFILE.exists()

    run(["dpkg", "--purge", PKG], env={"DEBIAN_FRONTEND": "noninteractive"})
    assert dpkg_status() == ""
    leftovers = [p for p in [*CONFFILES, "/etc/flannel", str(LOGFILE), ENABLED_LINK]
                 if os.path.lexists(p)] + glob.glob("/etc/rc?.d/[SK]??flanneld")
    assert not leftovers, f"left after purge: {leftovers}"


def test_purge_stops_the_daemon_the_init_script_started(installed, built_deb, tmp_path):
    """A purge (which removes first) of a package whose daemon runs, here one retrying an
    unreachable etcd, stops that daemon and takes its pidfile: nothing keeps running with its
    code deleted."""
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    if dpkg_status() != "ii":  # the test above purged it
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", built_deb], env=env,
            timeout=600)
    OPTIONS.write_text("FLANNELD_ETCD_ENDPOINTS=http://127.0.0.1:1\n")
    start = run([INIT, "start"], check=False, timeout=60)
    assert start.returncode == 0, start.stdout + start.stderr + log_tail()
    pid = daemon_pid()
    try:
        time.sleep(1)
        assert running(pid), f"flanneld should keep retrying etcd; {log_tail()}"
        run(allowing_service_actions(["apt-get", "purge", "-y", "-q", PKG], tmp_path), env=env,
            timeout=300)
        assert dpkg_status() == ""
        assert not running(pid), f"flanneld (pid {pid}) still runs after the purge"
        assert not PIDFILE.exists()
    finally:
        kill_left_over_daemon(pid)
