"""The netlink adapter against a real kernel, inside a namespace this module creates:
every ensure/remove is idempotent and leaves exactly the wanted state (checked with `ip -j`)."""

import os
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from flannel.errors import BackendError
from tests.support.nsagent import bridge_host, ip_json, sh

pytestmark = [
    pytest.mark.needs_root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

NL = "flannel.dataplane.netlink:"


@pytest.fixture(scope="module")
def agent():
    with bridge_host("nl") as agent:
        yield agent


@pytest.fixture(scope="module")
def ns(agent):
    return agent.ns


def routes_to(ns, dst):
    return [r for r in ip_json(ns, "-4 route show table main") if r["dst"] == dst]


def test_link_index_and_lookup(ns, agent):
    index = agent.call(NL + "link_index", "br0")
    assert index == ip_json(ns, "link show br0")[0]["ifindex"]
    assert agent.call(NL + "link_index", "nosuch0") is None
    ext = agent.call(NL + "lookup_external_interface", "br0", "10.99.0.1")
    assert (ext.name, ext.index) == ("br0", index)
    assert ext.iface_addr == IPv4Address("192.168.77.1")
    assert ext.ext_addr == IPv4Address("10.99.0.1")
    with pytest.raises(BackendError, match="nosuch0"):
        agent.call(NL + "lookup_external_interface", "nosuch0", None)


def test_ensure_link_up_sets_state_and_mtu_once(ns, agent):
    sh(ns, "ip link add brup type bridge")
    index = agent.call(NL + "link_index", "brup")
    agent.call(NL + "ensure_link_up", index, 1400)
    link = ip_json(ns, "link show brup")[0]
    assert "UP" in link["flags"] and link["mtu"] == 1400
    agent.call(NL + "ensure_link_up", index, 1400)
    agent.call(NL + "ensure_link_up", index)
    link = ip_json(ns, "link show brup")[0]
    assert "UP" in link["flags"] and link["mtu"] == 1400


def test_ensure_address_exclusive_and_idempotent(ns, agent):
    sh(ns, "ip link add braddr type bridge")
    index = agent.call(NL + "link_index", "braddr")

    def addrs():
        info = ip_json(ns, "-4 addr show dev braddr")[0]["addr_info"]
        return sorted(f"{a['local']}/{a['prefixlen']}" for a in info)

    agent.call(NL + "ensure_address", index, IPv4Interface("10.10.5.0/32"))
    agent.call(NL + "ensure_address", index, IPv4Interface("10.10.5.0/32"))
    assert addrs() == ["10.10.5.0/32"]
    # a new lease replaces the old address
    agent.call(NL + "ensure_address", index, IPv4Interface("10.10.7.0/32"))
    assert addrs() == ["10.10.7.0/32"]
    agent.call(NL + "ensure_address", index, IPv4Interface("10.10.8.0/16"), exclusive=False)
    assert addrs() == ["10.10.7.0/32", "10.10.8.0/16"]
    assert set(agent.call(NL + "connected_networks", index)) == {
        IPv4Network("10.10.7.0/32"), IPv4Network("10.10.0.0/16")
    }


def test_ensure_route_idempotent_and_replacing(ns, agent):
    br0 = agent.call(NL + "link_index", "br0")
    dst = IPv4Network("10.20.1.0/24")
    assert agent.call(NL + "ensure_route", dst, br0, IPv4Address("192.168.77.2")) is True
    assert agent.call(NL + "ensure_route", dst, br0, IPv4Address("192.168.77.2")) is False
    found = routes_to(ns, "10.20.1.0/24")
    assert [(r["gateway"], r["dev"]) for r in found] == [("192.168.77.2", "br0")]
    # a changed gateway replaces the route, never adds a second one
    assert agent.call(NL + "ensure_route", dst, br0, IPv4Address("192.168.77.3")) is True
    assert [r["gateway"] for r in routes_to(ns, "10.20.1.0/24")] == ["192.168.77.3"]
    # a stale route with another metric is replaced too
    sh(ns, "ip route add 10.20.2.0/24 via 192.168.77.9 dev br0 metric 50")
    agent.call(NL + "ensure_route", IPv4Network("10.20.2.0/24"), br0, IPv4Address("192.168.77.4"))
    assert [r["gateway"] for r in routes_to(ns, "10.20.2.0/24")] == ["192.168.77.4"]


def test_onlink_route_to_an_unconnected_gateway(ns, agent):
    br0 = agent.call(NL + "link_index", "br0")
    dst = IPv4Network("10.20.3.0/24")
    with pytest.raises(BackendError, match="10.20.3.0/24"):
        agent.call(NL + "ensure_route", dst, br0, IPv4Address("10.30.0.0"))
    assert agent.call(NL + "ensure_route", dst, br0, IPv4Address("10.30.0.0"), onlink=True)
    assert not agent.call(NL + "ensure_route", dst, br0, IPv4Address("10.30.0.0"), onlink=True)
    (route,) = routes_to(ns, "10.20.3.0/24")
    assert route["gateway"] == "10.30.0.0" and "onlink" in route["flags"]
    listed = agent.call(NL + "list_routes", oif=br0, dst=dst)
    assert [(r.gateway, r.onlink) for r in listed] == [(IPv4Address("10.30.0.0"), True)]


def test_remove_route_idempotent_and_filtered(ns, agent):
    br0 = agent.call(NL + "link_index", "br0")
    dst = IPv4Network("10.20.4.0/24")
    agent.call(NL + "ensure_route", dst, br0, IPv4Address("192.168.77.5"))
    # a filter that does not match leaves the route alone
    assert agent.call(NL + "remove_route", dst, br0, IPv4Address("192.168.77.6")) is False
    assert len(routes_to(ns, "10.20.4.0/24")) == 1
    assert agent.call(NL + "remove_route", dst, br0, IPv4Address("192.168.77.5")) is True
    assert routes_to(ns, "10.20.4.0/24") == []
    assert agent.call(NL + "remove_route", dst) is False
    assert agent.call(NL + "remove_route", dst, br0) is False
