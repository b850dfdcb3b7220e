"""End to end: real `python -m flannel` processes (alloc backend, no kernel changes) against
a real etcd on loopback. Subnet files, leases in etcd, restarts, invalid config, etcd
outages, leases deleted or taken behind the daemon's back, stopping within 5 s, READY=1,
and multi-network mode."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from flannel.network.subnet_env import parse_subnet_env
from tests.support.etcd import EtcdServer, free_port

pytestmark = pytest.mark.needs_etcd

REPO = Path(__file__).resolve().parents[2]
ALLOC = '{"Network": "10.10.0.0/16", "Backend": {"Type": "alloc"}}'
STOP_LIMIT = 5.0


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    with EtcdServer(tmp_path_factory.mktemp("etcd")) as server:
        yield server


@pytest.fixture
def prefix(request):
    return f"/fh2/{os.getpid()}/{request.node.name.translate({ord(c): '_' for c in '[]/ -:'})}"


class Flanneld:
    """One daemon process; output goes to a log file the test can read."""

    def __init__(self, workdir: Path, name: str, args: list, env: dict | None = None):
        self.log_path = workdir / f"{name}.log"
        self.args = args
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = None

    def start(self) -> "Flanneld":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "flannel", *self.args], env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM) -> tuple:
        """(exit status, seconds it took)."""
        began = time.monotonic()
        self.proc.send_signal(sig)
        try:
            status = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait(10)
        return status, time.monotonic() - began

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


@pytest.fixture
def daemons(tmp_path, etcd):
    """Factory: daemons(name, *extra_args, public_ip=..., prefix=...) started against etcd.
    Every daemon still running at the end is killed (by PID); its log is printed on failure."""
    started = []

    def make(name, *extra, prefix, public_ip="10.99.0.1", endpoints=None, env=None, start=True):
        args = [f"-etcd-endpoints={endpoints or etcd.endpoint}", f"-etcd-prefix={prefix}",
                "--iface=lo", f"--public-ip={public_ip}",
                f"--subnet-file={tmp_path / (name + '.subnet.env')}", *extra]
        daemon = Flanneld(tmp_path, name, args, env)
        daemon.subnet_file = tmp_path / f"{name}.subnet.env"
        started.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in started:
        if daemon.alive():
            daemon.proc.kill()
            daemon.proc.wait(10)
        print(f"----- {daemon.log_path.name}\n{daemon.log()[-4000:]}")


def wait_for(predicate, timeout=20.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def subnet_of(path: Path) -> IPv4Network | None:
    try:
        env = parse_subnet_env(path.read_text())
    except FileNotFoundError:
        return None
    return IPv4Interface(env["FLANNEL_SUBNET"]).network if "FLANNEL_SUBNET" in env else None


def leases(etcd, prefix: str) -> dict:
    """subnet key -> (value JSON, ttl) of every key under <prefix>/subnets."""
    status, doc = etcd.http("GET", f"/v2/keys{prefix}/subnets?recursive=true", check=False)
    if status != 200:
        return {}
    return {n["key"].rsplit("/", 1)[1]: (json.loads(n["value"]), n.get("ttl")) for n in doc["node"].get("nodes", [])}


def put(etcd, key: str, value: str, **params) -> None:
    """A form-encoded PUT, as etcdctl does (the value is JSON text)."""
    data = urllib.parse.urlencode({"value": value, **params}).encode()
    req = urllib.request.Request(f"{etcd.endpoint}/v2/keys{key}", data=data, method="PUT")
    req.add_header("Content-Type", "application/x-www-form-urlencoded")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status in (200, 201)


def delete(etcd, key: str, recursive=False) -> None:
    etcd.http("DELETE", f"/v2/keys{key}" + ("?recursive=true" if recursive else ""))


# -- leases and subnet files -----------------------------------------------------------


def test_two_daemons_get_distinct_subnets_and_correct_files(etcd, prefix, daemons):
    put(etcd, f"{prefix}/config", ALLOC)
    a = daemons("a", prefix=prefix, public_ip="10.99.0.1")
    b = daemons("b", prefix=prefix, public_ip="10.99.0.2")
    sa = wait_for(lambda: subnet_of(a.subnet_file))
    sb = wait_for(lambda: subnet_of(b.subnet_file))
    assert sa and sb and sa != sb
    for subnet in (sa, sb):
        assert subnet.prefixlen == 24 and subnet.subnet_of(IPv4Network("10.10.0.0/16"))
        assert subnet != IPv4Network("10.10.0.0/24"), "the first subnet is never handed out"
    assert a.subnet_file.read_text() == (
        f"FLANNEL_NETWORK=10.10.0.0/16\nFLANNEL_SUBNET={sa.network_address + 1}/24\n"
        "FLANNEL_MTU=65536\nFLANNEL_IPMASQ=false\n"  # alloc: the external (lo) MTU
    )
    assert a.subnet_file.stat().st_mode & 0o777 == 0o644
    found = leases(etcd, prefix)
    key_a, key_b = f"{sa.network_address}-24", f"{sb.network_address}-24"
    assert found[key_a][0] == {"PublicIP": "10.99.0.1"} and found[key_b][0] == {"PublicIP": "10.99.0.2"}
    assert 86000 < found[key_a][1] <= 86400
    for daemon in (a, b):
        status, took = daemon.stop()
        assert status == 0 and took < STOP_LIMIT
    assert set(leases(etcd, prefix)) == {key_a, key_b}, "leases are kept on stop"


def test_restart_reuses_the_subnet(etcd, prefix, daemons):
    put(etcd, f"{prefix}/config", ALLOC)
    first = daemons("first", prefix=prefix)
    subnet = wait_for(lambda: subnet_of(first.subnet_file))
    assert first.stop()[0] == 0
    first.subnet_file.unlink()  # by PublicIP alone
    again = daemons("first", prefix=prefix)
    assert wait_for(lambda: subnet_of(again.subnet_file)) == subnet
    assert len(leases(etcd, prefix)) == 1


def test_invalid_config_then_fixed(etcd, prefix, daemons):
    put(etcd, f"{prefix}/config", '{"Network": "10.10.0.0/16", "SubnetLen": 31}')
    d = daemons("bad", prefix=prefix)
    assert wait_for(lambda: "not usable" in d.log())
    time.sleep(1.5)
    assert d.alive() and not d.subnet_file.exists() and leases(etcd, prefix) == {}
    assert d.log().count("SubnetLen 31") == 1, "logged once per change"
    put(etcd, f"{prefix}/config", ALLOC)
    assert wait_for(lambda: subnet_of(d.subnet_file))
    assert len(leases(etcd, prefix)) == 1
    assert d.stop()[0] == 0


def test_missing_config_waits_and_stops_fast(etcd, prefix, daemons):
    d = daemons("waiting", prefix=prefix)
    assert wait_for(lambda: "waiting for a valid one" in d.log())
    status, took = d.stop()
    assert status == 0 and took < STOP_LIMIT
    assert not d.subnet_file.exists()


# -- reliability -------------------------------------------------------------------------


def test_etcd_unreachable_keeps_running_and_stops_fast(prefix, daemons):
    dead = f"http://127.0.0.1:{free_port()}"
    d = daemons("nodb", prefix=prefix, endpoints=dead)
    assert wait_for(lambda: "retrying" in d.log())
    time.sleep(2)
    assert d.alive()
    assert d.log().count("retrying until it works") == 1, "an outage is logged once"
    status, took = d.stop(signal.SIGINT)
    assert status == 0 and took < STOP_LIMIT


def test_a_second_signal_does_not_cut_the_orderly_stop_short(etcd, prefix, daemons):
    """Ctrl-C often arrives twice (the terminal, then a wrapper forwarding it): the stop
    still runs to its end (masquerade rules removed, "stopped" logged) instead of exiting."""
    put(etcd, f"{prefix}/config", ALLOC)
    d = daemons("twice", prefix=prefix)
    assert wait_for(lambda: subnet_of(d.subnet_file))
    d.proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    status, took = d.stop(signal.SIGTERM)
    assert status == 0 and took < STOP_LIMIT
    log = d.log()
    assert "received SIGTERM while stopping" in log
    assert "flanneld stopped (exit status 0)" in log and "exiting now" not in log


def test_etcd_restart_mid_run_then_lease_deleted_is_reclaimed(etcd, prefix, daemons):
    put(etcd, f"{prefix}/config", ALLOC)
    d = daemons("survivor", prefix=prefix)
    subnet = wait_for(lambda: subnet_of(d.subnet_file))
    etcd.stop()
    try:
        assert wait_for(lambda: "retrying" in d.log(), timeout=30)
        assert d.alive()
    finally:
        etcd.start()
    assert wait_for(lambda: "works again" in d.log(), timeout=30)
    assert d.alive()
    key = f"{subnet.network_address}-24"
    delete(etcd, f"{prefix}/subnets/{key}")
    again = wait_for(lambda: leases(etcd, prefix).get(key))
    assert again and again[0] == {"PublicIP": "10.99.0.1"} and again[1] > 86000
    assert wait_for(lambda: "is ours again" in d.log())
    assert d.alive() and subnet_of(d.subnet_file) == subnet
    assert d.stop()[0] == 0


def test_lease_taken_by_another_host_exits_nonzero(etcd, prefix, daemons):
    put(etcd, f"{prefix}/config", ALLOC)
    d = daemons("victim", prefix=prefix)
    subnet = wait_for(lambda: subnet_of(d.subnet_file))
    key = f"{prefix}/subnets/{subnet.network_address}-24"
    put(etcd, key, '{"PublicIP":"10.99.0.77"}', ttl=600)
    status = d.wait_exit(20)
    assert status == 1
    assert "10.99.0.77" in d.log() and "exiting so that the service manager restarts" in d.log()


def test_stop_with_etcd_down_after_lease(etcd, prefix, daemons, tmp_path):
    """SIGTERM within 5 s while every etcd request hangs or fails (etcd stopped mid-run)."""
    other = EtcdServer(tmp_path / "own-etcd").start()
    try:
        put(other, f"{prefix}/config", ALLOC)
        d = daemons("down", prefix=prefix, endpoints=other.endpoint)
        assert wait_for(lambda: subnet_of(d.subnet_file))
    finally:
        other.kill()
    time.sleep(1)
    status, took = d.stop()
    assert status == 0 and took < STOP_LIMIT


def test_ready_is_sent_after_the_subnet_file(etcd, prefix, daemons, tmp_path):
    put(etcd, f"{prefix}/config", ALLOC)
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(20)
        d = daemons("notified", prefix=prefix, env={"NOTIFY_SOCKET": str(path)})
        message = sock.recv(4096)
        assert message == b"READY=1"
        assert subnet_of(d.subnet_file) is not None, "READY=1 only once the subnet file exists"
        sock.settimeout(1.0)
        with pytest.raises(socket.timeout):
            sock.recv(4096)  # once
    assert d.stop()[0] == 0


# -- multi-network ---------------------------------------------------------------------


def test_multi_network_with_networks_flag(etcd, prefix, daemons, tmp_path):
    put(etcd, f"{prefix}/blue/config", ALLOC)
    put(etcd, f"{prefix}/red/config", ALLOC.replace("10.10.", "10.20."))
    subnet_dir = tmp_path / "nets"
    d = daemons("multi", "--networks=blue,red", f"--subnet-dir={subnet_dir}", prefix=prefix)
    blue = wait_for(lambda: subnet_of(subnet_dir / "blue.env"))
    red = wait_for(lambda: subnet_of(subnet_dir / "red.env"))
    assert blue.subnet_of(IPv4Network("10.10.0.0/16")) and red.subnet_of(IPv4Network("10.20.0.0/16"))
    assert not d.subnet_file.exists()
    status, keys = etcd.http("GET", f"/v2/keys{prefix}/red/subnets")
    assert [n["key"].rsplit("/", 1)[1] for n in keys["node"]["nodes"]] == [f"{red.network_address}-24"]
    assert d.stop()[0] == 0


def test_watch_networks_follows_networks(etcd, prefix, daemons, tmp_path):
    put(etcd, f"{prefix}/blue/config", ALLOC)
    subnet_dir = tmp_path / "nets"
    d = daemons("watcher", "--watch-networks", f"--subnet-dir={subnet_dir}", prefix=prefix)
    assert wait_for(lambda: subnet_of(subnet_dir / "blue.env"))
    put(etcd, f"{prefix}/green/config", ALLOC.replace("10.10.", "10.30."))
    green = wait_for(lambda: subnet_of(subnet_dir / "green.env"))
    assert green and green.subnet_of(IPv4Network("10.30.0.0/16"))
    delete(etcd, f"{prefix}/green", recursive=True)
    assert wait_for(lambda: not (subnet_dir / "green.env").exists())
    assert d.alive() and (subnet_dir / "blue.env").exists()
    assert d.stop()[0] == 0


# -- client/server mode ------------------------------------------------------------------


def test_server_and_remote_clients(etcd, prefix, daemons, tmp_path):
    """--listen serves the API (and takes no lease); --remote clients get their leases
    through it; the server stops within 5 s even with clients parked in long polls."""
    put(etcd, f"{prefix}/config", ALLOC)
    port = free_port()
    server = Flanneld(tmp_path, "server", [f"--etcd-endpoints={etcd.endpoint}",
                                           f"--etcd-prefix={prefix}", f"--listen=127.0.0.1:{port}"])
    server.start()
    try:
        assert wait_for(lambda: _connects(port)), server.log()
        clients = [daemons(f"client{i}", f"--remote=127.0.0.1:{port}", prefix=prefix,
                           public_ip=f"10.99.1.{i}") for i in (1, 2)]
        subnets = [wait_for(lambda c=c: subnet_of(c.subnet_file)) for c in clients]
        assert None not in subnets and subnets[0] != subnets[1]
        values = sorted(json.dumps(v) for v, _ttl in leases(etcd, prefix).values())
        assert values == ['{"PublicIP": "10.99.1.1"}', '{"PublicIP": "10.99.1.2"}']
        time.sleep(1)  # let the clients park their long polls
        status, took = server.stop()
        assert status == 0 and took < STOP_LIMIT
        assert all(c.alive() for c in clients), "clients ride out a server outage"
        for client in clients:
            status, took = client.stop()
            assert status == 0 and took < STOP_LIMIT
    finally:
        if server.alive():
            server.proc.kill()
            server.proc.wait(10)
        print(f"----- server.log\n{server.log()[-4000:]}")


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# -- in a namespace: default-route interface discovery and --ip-masq -----------------------


@pytest.mark.needs_root
def test_ip_masq_and_default_interface_in_a_namespace(tmp_path):
    """A host namespace whose uplink is its default route: flanneld finds eth0 by itself,
    installs the masquerade rules with --ip-masq, says so in subnet.env and removes the
    rules (but keeps the lease) when it stops."""
    from tests.support.netns import Cluster

    def masq_rules(host):
        listing = host.exec("iptables", "-w", "-t", "nat", "-S", "POSTROUTING", check=True).stdout
        return [line for line in listing.splitlines() if "flanneld masq" in line]

    with Cluster(tmp_path, hosts=1, prefix="fh2") as cluster:
        cluster.set_network_config(backend="alloc")
        host = cluster.hosts[0]
        host.start_flanneld("--ip-masq")
        env = host.wait_subnet_env()
        assert env["FLANNEL_IPMASQ"] == "true" and env["FLANNEL_MTU"] == "1500"
        subnet = host.lease_subnet()
        assert cluster.leases() == {subnet: {"PublicIP": host.ip}}
        rules = masq_rules(host)
        assert len(rules) == 4 and any(f"-d {subnet}" in r and "RETURN" in r for r in rules), rules
        assert host.stop_flanneld() == 0
        assert masq_rules(host) == []
        assert cluster.leases() == {subnet: {"PublicIP": host.ip}}, "the lease is kept on stop"
