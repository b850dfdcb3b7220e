"""Two "hosts" (namespaces joined by a veth pair), each running a real UdpBackend in a
process inside its namespace, exchanging traffic over the udp overlay with the kernel's ping.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel.subnet.config import NetworkConfig
from flannel.subnet.models import ADDED, Event, Lease, LeaseAttrs
from tests.support.nsagent import STOP, NsAgent, netns, sh

pytestmark = [
    pytest.mark.needs_root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates namespaces and TUN devices"),
]

PORT = 8399  # not the default, to see the Backend option at work
CONFIG = {"Network": "10.10.0.0/16", "Backend": {"Type": "udp", "Port": PORT}}
HOSTS = {"a": ("192.168.77.1", "10.10.1.0/24"), "b": ("192.168.77.2", "10.10.2.0/24")}


def _lease(name: str) -> Lease:
    public_ip, subnet = HOSTS[name]
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(public_ip)))


class Host:
    def __init__(self, ns: str, name: str):
        self.ns, self.name = ns, name
        self.agent = NsAgent(ns)

    def start(self, batch: int | None = None) -> None:
        """A new UdpBackend for our lease (`batch`: packets per system call in the proxy)."""
        ext = self.agent.call("flannel.dataplane.netlink:lookup_external_interface", "fpxveth", None)
        self.agent.new("udp", "flannel.backend.udp:UdpBackend", ext, NetworkConfig.parse(CONFIG))
        if batch is not None:
            self.agent.invoke("udp", "__setattr__", "batch", batch)
        self.agent.invoke("udp", "start", _lease(self.name), STOP)

    def stop(self) -> None:
        self.agent.invoke("udp", "stop")

    def apply(self, *events: Event) -> None:
        self.agent.invoke("udp", "apply", list(events))

    def counters(self) -> dict:
        return self.agent.invoke("udp", "counters")

    def ping(self, dst: str, *args: str) -> tuple:
        out = sh(self.ns, f"ping -n -c1 -W3 {' '.join(args)} {dst} 2>&1; echo rc=$?", check=False)
        return int(out.rsplit("rc=", 1)[1]), out


def start_pair(hosts: dict, batch: int | None = None) -> None:
    """(Re)start both backends and give each the other's lease."""
    for host in hosts.values():
        host.start(batch)
    hosts["a"].apply(Event(ADDED, _lease("b")))
    hosts["b"].apply(Event(ADDED, _lease("a")))


@contextlib.contextmanager
def two_hosts():
    """Namespaces a and b on one veth link, each with a running UdpBackend peered with the
    other; everything is removed afterwards, also on failure."""
    tag = uuid.uuid4().hex[:5]
    with netns(f"fpx{tag}a") as ns_a, netns(f"fpx{tag}b") as ns_b:
        sh(None, f"ip link add fpxveth netns {ns_a} type veth peer name fpxveth netns {ns_b}")
        for ns, name in ((ns_a, "a"), (ns_b, "b")):
            sh(ns, f"ip addr add {HOSTS[name][0]}/24 dev fpxveth && ip link set fpxveth up")
        made = {}
        try:
            for ns, name in ((ns_a, "a"), (ns_b, "b")):
                made[name] = Host(ns, name)
            start_pair(made)
            yield made
        finally:
            for host in made.values():
                host.agent.close()


@pytest.fixture(scope="module")
def hosts():
    with two_hosts() as made:
        yield made


def test_device_address_mtu_route_and_socket(hosts):
    a = hosts["a"]
    link = sh(a.ns, "ip -4 -o addr show dev flannel0")
    assert "10.10.1.0/16" in link
    assert "mtu 1472" in sh(a.ns, "ip -o link show dev flannel0")
    assert "10.10.0.0/16" in sh(a.ns, "ip -4 route show dev flannel0")
    assert f"192.168.77.1:{PORT}" in sh(a.ns, "ss -uln")


def test_ping_across_decrements_ttl_on_both_sides(hosts):
    rc, out = hosts["a"].ping("10.10.2.0")
    assert rc == 0, out
    assert "ttl=62" in out, out  # 64, minus one in each proxy
    rc, out = hosts["b"].ping("10.10.1.0")
    assert rc == 0 and "ttl=62" in out, out


def test_mtu_sized_dont_fragment_ping_passes_and_larger_fails(hosts):
    rc, out = hosts["a"].ping("10.10.2.0", "-M do", "-s 1444")  # 1444 + 28 = MTU 1472
    assert rc == 0, out
    rc, out = hosts["a"].ping("10.10.2.0", "-M do", "-s 1445")
    assert rc != 0
    assert re.search(r"(?i)message too long|mtu", out), out


def test_unknown_overlay_address_gets_net_unreachable(hosts):
    rc, out = hosts["a"].ping("10.10.77.1")
    assert rc != 0
    assert "From 10.10.1.0" in out and "Destination Net Unreachable" in out, out


def test_removed_peer_becomes_unreachable_and_comes_back(hosts):
    a = hosts["a"]
    a.apply(Event.removed(IPv4Network(HOSTS["b"][1])))
    try:
        rc, out = a.ping("10.10.2.0")
        assert rc != 0 and "Destination Net Unreachable" in out, out
    finally:
        a.apply(Event(ADDED, _lease("b")))
    rc, out = a.ping("10.10.2.0")
    assert rc == 0, out


def test_own_lease_is_never_routed_and_counters_add_up(hosts):
    a = hosts["a"]
    before = a.counters()
    a.apply(Event(ADDED, _lease("a")))
    rc, out = a.ping("10.10.2.0", "-c3 -i0.2")
    assert rc == 0, out
    after = a.counters()
    assert after["routes"] == before["routes"] == 1
    assert after["udp_tx_packets"] - before["udp_tx_packets"] >= 3
    assert after["tun_tx_packets"] - before["tun_tx_packets"] >= 3


def test_stop_removes_the_tun_and_a_new_backend_takes_over(hosts):
    a = hosts["a"]
    a.stop()
    assert "flannel0" not in sh(a.ns, "ip -o link show")  # the TUN goes with the fd, as in Go
    hosts["b"].stop()
    start_pair(hosts)
    rc, out = a.ping("10.10.2.0")
    assert rc == 0, out
