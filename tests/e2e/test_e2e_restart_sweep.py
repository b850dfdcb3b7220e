"""A restarted flanneld removes what a peer that left while it was down had in its kernel.

Three hosts (namespaces, prefix fsw) run real flanneld processes against a real etcd. Host A
stops; host C stops and its lease is revoked, as when a machine is retired; B drops C at once
(a watch event), but A learns of it only from its first snapshot after the restart, which
holds no removal: the backend's sync must sweep C's route (and, for vxlan, its neighbour and
forwarding entry) while B's entries stay and A and B still reach each other.
"""

from __future__ import annotations

import ipaddress

import pytest

from tests.support.netns import Cluster, Host, wait_for

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_etcd]


def vtep_mac(host: Host) -> str:
    return host.json("ip", "link", "show", "flannel.1")[0]["address"]


def vxlan_entries(host: Host, mac: str, gateway: str) -> tuple:
    """(forwarding entries of `mac`, neighbour entries at `gateway`) on host's flannel.1."""
    fdb = [f for f in host.json("bridge", "fdb", "show", "dev", "flannel.1") if f["mac"] == mac]
    neigh = [n for n in host.json("ip", "-4", "neigh", "show", "dev", "flannel.1") if n["dst"] == gateway]
    return fdb, neigh


@pytest.fixture(params=["host-gw", "vxlan"])
def cluster(request, tmp_path):
    with Cluster(tmp_path, hosts=3, prefix="fsw", tag=request.param[0]) as c:
        c.set_network_config(request.param)
        c.start_all()
        for host in c.hosts:
            host.add_bridge_address(host.read_subnet_env()["FLANNEL_SUBNET"])
        c.backend = request.param
        yield c


def test_restart_sweeps_entries_of_a_peer_that_left_meanwhile(cluster):
    a, b, c = cluster.hosts
    sub_b, sub_c = b.lease_subnet(), c.lease_subnet()
    gw_c = str(ipaddress.IPv4Network(sub_c).network_address)
    for subnet in (sub_b, sub_c):
        wait_for(lambda: a.route_to(subnet) is not None, 30, f"A to learn {subnet}")
    if cluster.backend == "vxlan":
        mac_c = vtep_mac(c)
        assert all(vxlan_entries(a, mac_c, gw_c)), "A has no vxlan entries for C before the test"

    stamp = a.subnet_stamp()
    assert a.stop_flanneld() == 0, a.log_tail()
    assert c.stop_flanneld() == 0, c.log_tail()
    cluster.revoke_lease(sub_c)
    wait_for(lambda: b.route_to(sub_c) is None, 30, "B (running) to drop C")
    assert a.route_to(sub_c) is not None, "A's entries for C must outlive A's daemon"

    a.start_flanneld()
    a.wait_subnet_env(newer_than=stamp)
    wait_for(lambda: a.route_to(sub_c) is None, 30, "restarted A to remove C's route")
    assert a.route_to(sub_b) is not None, f"A lost B's route:\n{a.routes()}"
    assert a.route_to(a.lease_subnet()) is not None  # its own bridge's route, untouched
    if cluster.backend == "vxlan":
        assert vxlan_entries(a, mac_c, gw_c) == ([], []), "C's forwarding entry or neighbour stayed"
        fdb_b, neigh_b = vxlan_entries(a, vtep_mac(b), str(ipaddress.IPv4Network(sub_b).network_address))
        assert fdb_b and fdb_b[0]["dst"] == b.ip and neigh_b, (fdb_b, neigh_b)
    else:
        assert a.route_to(sub_b)["gateway"] == b.ip
    assert "of peers that are gone" in a.log_tail(200)
    a.wait_ping(b.overlay_ip(), source=a.overlay_ip())
    b.wait_ping(a.overlay_ip(), source=b.overlay_ip())
