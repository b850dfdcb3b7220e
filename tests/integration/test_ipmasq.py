"""--ip-masq rules in a real nat table, inside namespaces this module creates.

Two namespaces on a veth pair: "host" (192.168.77.1, overlay subnet 10.10.5.0/24 on a bridge,
as docker0 would hold it) and "outside" (192.168.77.2, with no route back to the overlay).
A ping from an overlay address to the outside only comes back when it was masqueraded.
"""

import os
import re
from ipaddress import IPv4Network

import pytest

from flannel.dataplane.ipmasq import COMMENT, masquerade_rules
from tests.support.nsagent import NsAgent, netns, sh, unique

pytestmark = [
    pytest.mark.needs_root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

NETWORK = IPv4Network("10.10.0.0/16")
SUBNET = IPv4Network("10.10.5.0/24")
IPM = "flannel.dataplane.ipmasq:"


@pytest.fixture(scope="module")
def hosts():
    tag = unique("")
    with netns(tag + "h") as host, netns(tag + "o") as outside:
        veth_h, veth_o = tag + "a", tag + "b"
        sh(None, f"ip link add {veth_h} netns {host} type veth peer name {veth_o} netns {outside}")
        sh(host, f"ip addr add 192.168.77.1/24 dev {veth_h} && ip link set {veth_h} up "
                 "&& ip link add fnlbr type bridge && ip addr add 10.10.5.1/24 dev fnlbr "
                 "&& ip link set fnlbr up && ip route add 10.10.0.0/16 via 192.168.77.2")
        sh(outside, f"ip addr add 192.168.77.2/24 dev {veth_o} && ip link set {veth_o} up "
                    "&& ip addr add 10.10.9.9/32 dev lo "
                    "&& iptables -w 5 -A INPUT -s 10.10.5.1 -d 10.10.9.9 -j ACCEPT")
        yield host, outside


@pytest.fixture(scope="module")
def agent(hosts):
    agent = NsAgent(hosts[0])
    try:
        yield agent
    finally:
        agent.close()


@pytest.fixture
def clean(hosts, agent):
    """Each test starts and ends without our rules."""
    agent.call(IPM + "teardown_masquerade", NETWORK, SUBNET)
    yield
    agent.call(IPM + "teardown_masquerade", NETWORK, SUBNET)


def our_rules(ns):
    """(packet count, rule) of every rule tagged with our comment, in chain order."""
    out = []
    for line in sh(ns, "iptables-save -c -t nat").splitlines():
        m = re.match(r"\[(\d+):\d+\] -A POSTROUTING (.*)$", line)
        if m and COMMENT in line:
            out.append((int(m.group(1)), m.group(2)))
    return out


def expected_rules():
    """The rules as iptables-save prints them (the comment quoted)."""
    text = []
    for rule in masquerade_rules(NETWORK, SUBNET):
        parts = [f'"{p}"' if p == COMMENT else p for p in rule]
        text.append(" ".join(parts))
    return text


def ping(ns, src, dst):
    return sh(ns, f"ping -c 1 -W 1 -I {src} {dst}", check=False)


def test_rules_present_once_after_two_setups(hosts, agent, clean):
    host = hosts[0]
    agent.call(IPM + "setup_masquerade", NETWORK, SUBNET)
    agent.call(IPM + "setup_masquerade", NETWORK, SUBNET)
    rules = [rule for _count, rule in our_rules(host)]
    assert rules == expected_rules()
    agent.call(IPM + "teardown_masquerade", NETWORK, SUBNET)
    agent.call(IPM + "teardown_masquerade", NETWORK, SUBNET)
    assert our_rules(host) == []


def test_partial_set_is_rebuilt_in_order(hosts, agent, clean):
    host = hosts[0]
    agent.call(IPM + "setup_masquerade", NETWORK, SUBNET)
    first = masquerade_rules(NETWORK, SUBNET)[0]
    sh(host, "iptables -t nat -D POSTROUTING " + " ".join(
        f"'{p}'" for p in first))
    assert len(our_rules(host)) == 3
    agent.call(IPM + "setup_masquerade", NETWORK, SUBNET)
    assert [rule for _c, rule in our_rules(host)] == expected_rules()


def test_rules_of_an_earlier_subnet_are_replaced_and_other_networks_kept(hosts, agent, clean):
    """kill -9, then a restart with another lease: the old subnet's RETURN rule would keep
    host traffic to that subnet (now a peer's) from being masqueraded."""
    host = hosts[0]
    other_net, other_sub = IPv4Network("10.30.0.0/16"), IPv4Network("10.30.1.0/24")
    old = IPv4Network("10.10.7.0/24")
    agent.call(IPM + "setup_masquerade", other_net, other_sub)  # another network's rules
    try:
        agent.call(IPM + "setup_masquerade", NETWORK, old)  # the run that was killed
        agent.call(IPM + "setup_masquerade", NETWORK, SUBNET)
        ours = [rule for _c, rule in our_rules(host) if "10.30." not in rule]
        assert ours == expected_rules()
        assert sum("10.30." in rule for _c, rule in our_rules(host)) == 4
    finally:
        agent.call(IPM + "teardown_masquerade", other_net, other_sub)


def test_traffic_leaving_the_overlay_is_masqueraded(hosts, agent, clean):
    host, _outside = hosts
    # without the rules the outside host cannot answer an overlay source address
    assert " 0% packet loss" not in ping(host, "10.10.5.1", "192.168.77.2")
    agent.call(IPM + "setup_masquerade", NETWORK, SUBNET)
    assert " 0% packet loss" in ping(host, "10.10.5.1", "192.168.77.2")
    counts = [count for count, _rule in our_rules(host)]
    assert counts[1] >= 1, f"the MASQUERADE rule saw no packet: {our_rules(host)}"


def test_overlay_to_overlay_traffic_keeps_its_source(hosts, agent, clean):
    host, outside = hosts
    agent.call(IPM + "setup_masquerade", NETWORK, SUBNET)
    before = [count for count, _rule in our_rules(host)]
    arrived = arrivals_from_overlay(outside)
    # the reply cannot come back (outside has no route to 10.10.5.0/24): counters on both
    # sides tell which rule the packet hit and with which source it arrived
    ping(host, "10.10.5.1", "10.10.9.9")
    after = [count for count, _rule in our_rules(host)]
    assert after[0] == before[0] + 1, "overlay -> overlay did not hit the RETURN rule"
    assert after[1:] == before[1:]
    assert arrivals_from_overlay(outside) == arrived + 1


def arrivals_from_overlay(ns):
    """Packets that reached `ns` with the overlay source 10.10.5.1 (an INPUT rule's counter)."""
    for line in sh(ns, "iptables-save -c -t filter").splitlines():
        if "-s 10.10.5.1/32" in line and "-d 10.10.9.9/32" in line:
            return int(re.match(r"\[(\d+):", line).group(1))
    raise AssertionError("the counting rule in the outside namespace is missing")
