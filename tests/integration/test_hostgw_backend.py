"""The host-gw backend against a real kernel, inside namespaces this module creates:
peer routes, their restoration after deletion or link down/up, NAT refusal, and a ping
between two hosts' overlay addresses."""

import os
import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel.backend.base import ExternalInterface
from flannel.backend.hostgw import CHECK_INTERVAL, HostGwBackend
from flannel.errors import BackendError
from flannel.subnet.config import NetworkConfig
from flannel.subnet.models import Event, Lease, LeaseAttrs
from tests.support.nsagent import STOP, bridge_host, ip_json, sh, veth_hosts

NL = "flannel.dataplane.netlink:"
HG = "flannel.backend.hostgw:HostGwBackend"
CONFIG = NetworkConfig.parse({"Network": "10.10.0.0/16", "Backend": {"Type": "host-gw"}})
RESTORE_DEADLINE = 10.0  # seconds, the promise made for lost routes


def root_only(test):
    skip = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")
    return pytest.mark.needs_root(skip(test))


def lease(subnet, public_ip, btype="host-gw"):
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(public_ip), btype))


def added(*leases):
    return [Event("added", item) for item in leases]


def overlay_routes(ns):
    return {r["dst"]: (r.get("gateway"), r["dev"]) for r in ip_json(ns, "-4 route show")
            if r["dst"].startswith("10.10.")}


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


# -- no kernel ----------------------------------------------------------------------

def test_refuses_to_run_behind_nat():
    ext = ExternalInterface("eth0", 2, IPv4Address("192.168.77.1"), IPv4Address("203.0.113.7"), 1500)
    with pytest.raises(BackendError, match="203.0.113.7.*192.168.77.1"):
        HostGwBackend(ext, CONFIG)


def test_mtu_is_the_external_one():
    ext = ExternalInterface("eth0", 2, IPv4Address("192.168.77.1"), IPv4Address("192.168.77.1"), 1400)
    assert HostGwBackend(ext, CONFIG).mtu == 1400
    assert CHECK_INTERVAL < RESTORE_DEADLINE / 2


# -- one namespace ------------------------------------------------------------------

@pytest.fixture(scope="module")
def agent():
    with bridge_host("hg") as agent:
        yield agent


@pytest.fixture(scope="module")
def backend(agent):
    """A started backend (own subnet 10.10.1.0/24) kept by the agent as "hg"."""
    ext = agent.call(NL + "lookup_external_interface", "br0", None)
    agent.new("hg", HG, ext, CONFIG)
    agent.invoke("hg", "start", lease("10.10.1.0/24", "192.168.77.1"), STOP)
    return "hg"


@root_only
def test_peer_routes_added_replaced_removed(agent, backend):
    ns = agent.ns
    own = lease("10.10.1.0/24", "192.168.77.1")
    agent.invoke(backend, "apply", added(lease("10.10.2.0/24", "192.168.77.2"), own))
    agent.invoke(backend, "apply", added(lease("10.10.2.0/24", "192.168.77.2")))
    assert overlay_routes(ns) == {"10.10.2.0/24": ("192.168.77.2", "br0")}
    # a stale route to the same subnet (an earlier peer, another metric) is replaced
    sh(ns, "ip route add 10.10.3.0/24 via 192.168.77.99 dev br0 metric 7")
    agent.invoke(backend, "apply", added(
        lease("10.10.3.0/24", "192.168.77.3"),
        lease("10.10.4.0/24", "192.168.77.4", "vxlan"),  # another backend: skipped
        lease("10.10.8.0/24", "192.168.77.1"),  # an old lease of ours: a route via us would loop
    ))
    assert overlay_routes(ns) == {
        "10.10.2.0/24": ("192.168.77.2", "br0"), "10.10.3.0/24": ("192.168.77.3", "br0"),
    }
    agent.invoke(backend, "apply", [Event.removed(IPv4Network("10.10.3.0/24"))])
    agent.invoke(backend, "apply", [Event.removed(IPv4Network("10.10.3.0/24"))])
    assert overlay_routes(ns) == {"10.10.2.0/24": ("192.168.77.2", "br0")}


@root_only
def test_deleted_route_is_restored(agent, backend):
    ns = agent.ns
    agent.invoke(backend, "apply", added(lease("10.10.5.0/24", "192.168.77.5")))
    sh(ns, "ip route del 10.10.5.0/24")
    assert "10.10.5.0/24" not in overlay_routes(ns)
    assert wait_for(lambda: "10.10.5.0/24" in overlay_routes(ns), RESTORE_DEADLINE), \
        "the deleted route was not restored"
    assert overlay_routes(ns)["10.10.5.0/24"] == ("192.168.77.5", "br0")


@root_only
def test_routes_restored_after_link_down_up(agent, backend):
    ns = agent.ns
    agent.invoke(backend, "apply", added(lease("10.10.6.0/24", "192.168.77.6")))
    want = overlay_routes(ns)
    assert "10.10.6.0/24" in want
    sh(ns, "ip link set br0 down")
    assert overlay_routes(ns) == {}  # the kernel dropped them with the link
    sh(ns, "ip link set br0 up")
    assert wait_for(lambda: overlay_routes(ns) == want, RESTORE_DEADLINE), overlay_routes(ns)


@root_only
def test_stop_ends_the_thread_and_keeps_routes(agent):
    ext = agent.call(NL + "lookup_external_interface", "br0", None)
    agent.new("hg2", HG, ext, CONFIG)
    agent.invoke("hg2", "start", lease("10.10.1.0/24", "192.168.77.1"), STOP)
    agent.invoke("hg2", "apply", added(lease("10.10.7.0/24", "192.168.77.7")))
    names = agent.call("tests.support.nsagent:thread_names")
    assert names.count("hostgw-routes-br0") >= 1
    agent.invoke("hg2", "stop")
    assert agent.call("tests.support.nsagent:thread_names").count("hostgw-routes-br0") == (
        names.count("hostgw-routes-br0") - 1
    )
    assert overlay_routes(agent.ns)["10.10.7.0/24"] == ("192.168.77.7", "br0")


# -- two namespaces -----------------------------------------------------------------

@root_only
def test_two_hosts_ping_between_their_subnets():
    with veth_hosts("hg") as hosts:
        leases = []
        for number, (agent, dev) in enumerate(hosts, start=1):
            # a bridge holding the subnet's first address stands in for docker0
            sh(agent.ns, f"ip link add cbr0 type bridge && ip addr add 10.10.{number}.1/24 dev cbr0 "
                         "&& ip link set cbr0 up")
            ext = agent.call(NL + "lookup_external_interface", dev, None)
            agent.new("hg", HG, ext, CONFIG)
            leases.append(Lease(IPv4Network(f"10.10.{number}.0/24"), agent.invoke("hg", "lease_attrs")))
            agent.invoke("hg", "start", leases[-1], STOP)
        assert leases[0].attrs == LeaseAttrs(IPv4Address("192.168.77.1"), "host-gw")
        for (agent, _dev), other in zip(hosts, reversed(leases)):
            agent.invoke("hg", "apply", added(other))
        out = sh(hosts[0][0].ns, "ping -c 2 -i 0.2 -W 2 -I 10.10.1.1 10.10.2.1", check=False)
        assert " 0% packet loss" in out, out
