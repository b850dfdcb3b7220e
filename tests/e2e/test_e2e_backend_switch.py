"""Switching a network's backend: two hosts (namespaces, prefix fbs) run real flanneld
processes on vxlan; the config's Backend.Type becomes udp and both restart. The per-peer
routes vxlan left (`<peer subnet> via <.0> dev flannel.1 onlink`, more specific than udp's
`10.10.0.0/16 dev flannel0`) must be gone, or traffic to the peer would still go into a
VXLAN device nobody maintains; the hosts reach each other over udp.
"""

from __future__ import annotations

import ipaddress

import pytest

from tests.support.netns import OVERLAY, Cluster, Host, wait_for

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_etcd]


def subnet_of(host: Host) -> str:
    return str(ipaddress.ip_interface(host.read_subnet_env()["FLANNEL_SUBNET"]).network)


def addr(host: Host) -> str:
    return str(ipaddress.ip_interface(host.read_subnet_env()["FLANNEL_SUBNET"]).ip)


def route_to(host: Host, subnet: str) -> dict | None:
    return next((r for r in host.json("ip", "-4", "route", "show") if r.get("dst") == subnet), None)


def test_switch_from_vxlan_to_udp_removes_vxlan_routes_and_traffic_flows(tmp_path):
    with Cluster(tmp_path, hosts=2, prefix="fbs") as cluster:
        a, b = cluster.hosts
        cluster.set_network_config("vxlan")
        cluster.start_all()
        for host in cluster.hosts:
            host.add_bridge_address(host.read_subnet_env()["FLANNEL_SUBNET"])
        subnets = {a: subnet_of(a), b: subnet_of(b)}
        for host, peer in ((a, b), (b, a)):
            wait_for(lambda: (route_to(host, subnets[peer]) or {}).get("dev") == "flannel.1", 30,
                     f"{host.name} to route {subnets[peer]} into flannel.1")
        a.wait_ping(addr(b), source=addr(a))

        stamps = {host: host.subnet_stamp() for host in cluster.hosts}
        for host in cluster.hosts:
            assert host.stop_flanneld() == 0, host.log_tail()
        cluster.set_network_config("udp")
        for host in cluster.hosts:
            host.start_flanneld()
        for host in cluster.hosts:
            env = host.wait_subnet_env(newer_than=stamps[host])
            assert env["FLANNEL_MTU"] == "1472", env  # udp's: external MTU - 28
            assert subnet_of(host) == subnets[host], "the lease should survive the switch"

        for host, peer in ((a, b), (b, a)):
            assert route_to(host, subnets[peer]) is None, f"{host.name} kept vxlan's route:\n{host.routes()}"
            assert route_to(host, OVERLAY)["dev"] == "flannel0", host.routes()
            assert route_to(host, subnets[host])["dev"] == "cni0"  # its own bridge's route, untouched
            assert "that an earlier backend left" in host.log_tail(200)
            # the old device stays (another network could use it), with no route into it
            assert host.exec("ip", "link", "show", "flannel.1").returncode == 0
            assert all(r.get("dev") != "flannel.1" for r in host.json("ip", "-4", "route", "show"))
        a.wait_ping(addr(b), source=addr(a))
        b.wait_ping(addr(a), source=addr(b))
