"""Switching a network's backend: two hosts (namespaces, prefix fbs) run real flanneld
processes on vxlan; the config's Backend.Type becomes udp and both restart. The per-peer
routes vxlan left (`<peer subnet> via <.0> dev flannel.1 onlink`, more specific than udp's
`10.10.0.0/16 dev flannel0`) must be gone, or traffic to the peer would still go into a
VXLAN device nobody maintains; the hosts reach each other over udp.
"""

from __future__ import annotations

import pytest

from tests.support.netns import OVERLAY, Cluster, wait_for

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_etcd]


def test_switch_from_vxlan_to_udp_removes_vxlan_routes_and_traffic_flows(tmp_path):
    with Cluster(tmp_path, hosts=2, prefix="fbs") as cluster:
        a, b = cluster.hosts
        cluster.set_network_config("vxlan")
        cluster.start_all()
        for host in cluster.hosts:
            host.add_bridge_address(host.read_subnet_env()["FLANNEL_SUBNET"])
        subnets = {a: a.lease_subnet(), b: b.lease_subnet()}
        for host, peer in ((a, b), (b, a)):
            wait_for(lambda: (host.route_to(subnets[peer]) or {}).get("dev") == "flannel.1", 30,
                     f"{host.name} to route {subnets[peer]} into flannel.1")
        a.wait_ping(b.overlay_ip(), source=a.overlay_ip())

        stamps = {host: host.subnet_stamp() for host in cluster.hosts}
        for host in cluster.hosts:
            assert host.stop_flanneld() == 0, host.log_tail()
        cluster.set_network_config("udp")
        for host in cluster.hosts:
            host.start_flanneld()
        for host in cluster.hosts:
            env = host.wait_subnet_env(newer_than=stamps[host])
            assert env["FLANNEL_MTU"] == "1472", env  # udp's: external MTU - 28
            assert host.lease_subnet() == subnets[host], "the lease should survive the switch"

        for host, peer in ((a, b), (b, a)):
            assert host.route_to(subnets[peer]) is None, f"{host.name} kept vxlan's route:\n{host.routes()}"
            assert host.route_to(OVERLAY)["dev"] == "flannel0", host.routes()
            assert host.route_to(subnets[host])["dev"] == "cni0"  # its own bridge's route, untouched
            assert "that an earlier backend left" in host.log_tail(200)
            # the old device stays (another network could use it), with no route into it
            assert host.exec("ip", "link", "show", "flannel.1").returncode == 0
            assert all(r.get("dev") != "flannel.1" for r in host.json("ip", "-4", "route", "show"))
        a.wait_ping(b.overlay_ip(), source=a.overlay_ip())
        b.wait_ping(a.overlay_ip(), source=b.overlay_ip())
