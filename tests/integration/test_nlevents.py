"""ChangeMonitor against a real kernel, in a namespace this module creates: which changes
it reports for the links it follows (routes through them, their state, neighbour and
forwarding entries of the neighbour links) and which it ignores (other links, neighbours
of links it follows for routes only)."""

import os
import subprocess

import pytest

from flannel.dataplane.nlevents import ChangeMonitor
from tests.support.nsagent import bridge_host, sh

pytestmark = [
    pytest.mark.needs_root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]


def probe(links, neighbour_links, command):
    """Run inside the namespace: whether `command` makes a monitor of these links report a
    change. The kernel sends a notification before it answers the command, so it is queued
    when the command returns."""
    index = {name: int(open(f"/sys/class/net/{name}/ifindex").read()) for name in os.listdir("/sys/class/net")}
    monitor = ChangeMonitor({index[n] for n in links}, {index[n] for n in neighbour_links})
    try:
        assert not monitor.drain()
        subprocess.run(command, shell=True, check=True)
        return monitor.drain()
    finally:
        monitor.close()


@pytest.fixture(scope="module")
def agent():
    with bridge_host("nle") as agent:
        sh(agent.ns, "ip link add other0 type bridge && ip addr add 172.31.0.1/24 dev other0 && ip link set other0 up"
                     " && ip link add flannel.3 type vxlan id 3 local 192.168.77.1 dev br0 dstport 8472 nolearning"
                     " && ip addr add 10.10.1.0/32 dev flannel.3 && ip link set flannel.3 up")
        yield agent


PROBE = "tests.integration.test_nlevents:probe"


@pytest.mark.parametrize("links, neighbour_links, command, reported", [
    (["br0"], [], "ip route add 10.10.5.0/24 via 192.168.77.5 dev br0", True),
    (["br0"], [], "ip route del 10.10.5.0/24", True),
    (["br0"], [], "ip route add 10.10.6.0/24 via 172.31.0.6 dev other0", False),
    (["br0"], [], "ip route del 10.10.6.0/24", False),
    (["br0"], [], "ip link set br0 down && ip link set br0 up", True),
    (["br0"], [], "ip link set other0 down && ip link set other0 up", False),
    (["br0"], [], "ip neigh add 192.168.77.9 lladdr 2e:aa:00:00:00:09 dev br0 nud permanent", False),
    (["flannel.3"], ["flannel.3"], "ip neigh add 10.10.7.0 lladdr 2e:aa:00:00:00:07 dev flannel.3 nud permanent", True),
    (["flannel.3"], ["flannel.3"], "ip neigh replace 10.10.7.0 lladdr 2e:aa:00:00:00:08 dev flannel.3 nud permanent", True),
    (["flannel.3"], ["flannel.3"], "bridge fdb add 2e:aa:00:00:00:08 dev flannel.3 dst 192.168.77.7", True),
    (["flannel.3"], ["flannel.3"], "bridge fdb del 2e:aa:00:00:00:08 dev flannel.3 dst 192.168.77.7", True),
    (["flannel.3"], ["flannel.3"], "ip neigh add 172.31.0.9 lladdr 2e:aa:00:00:00:09 dev other0 nud permanent", False),
    (["flannel.3"], ["flannel.3"], "ip route add 10.10.7.0/24 via 10.10.7.0 dev flannel.3 onlink", True),
    (["flannel.3"], ["flannel.3"], "ip link set flannel.3 down && ip link set flannel.3 up", True),
    (["flannel.3"], ["flannel.3"], "true", False),
])
def test_reported_changes(agent, links, neighbour_links, command, reported):
    assert agent.call(PROBE, links, neighbour_links, command) is reported
