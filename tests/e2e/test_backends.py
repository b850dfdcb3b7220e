"""Every data-path backend end to end: three hosts (network namespaces on one underlay bridge)
each run a real flanneld against a real etcd, and real traffic crosses the overlay.

One cluster per backend serves all of that backend's tests (class scope). Test order matters
and follows pytest's collection order for inherited tests (base classes first): the common
checks, then the backend's own checks, then the destructive ones (restart, etcd outage, a host
leaving for good), which run last because they change the cluster.
"""

from __future__ import annotations

import ipaddress
import itertools
import json

import pytest

from tests.support.netns import OVERLAY, Cluster, Host, wait_for

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_etcd]

FAKE_PEER_IP = "192.168.77.200"  # a public IP no host has: only its lease exists
FAKE_VTEP_MAC = "0a:58:0a:0a:fe:01"


def subnet_of(host: Host) -> ipaddress.IPv4Network:
    return ipaddress.ip_interface(host.read_subnet_env()["FLANNEL_SUBNET"]).network


def free_subnet(cluster: Cluster) -> ipaddress.IPv4Network:
    taken = set(cluster.leases())
    return next(
        ipaddress.IPv4Network(f"10.10.{x}.0/24") for x in range(254, 0, -1) if f"10.10.{x}.0/24" not in taken
    )


def route_to(host: Host, subnet) -> dict | None:
    """The main-table route for exactly `subnet` on `host`, as iproute2 JSON, or None."""
    for route in host.json("ip", "-4", "route", "show"):
        if route.get("dst") == str(subnet):
            return route
    return None


@pytest.fixture(scope="class")
def cluster(request, tmp_path_factory):
    """Three hosts running flanneld with the class's backend."""
    cls = request.cls
    with Cluster(tmp_path_factory.mktemp(f"e2e-{cls.backend}"), hosts=3, tag=cls.tag) as c:
        c.set_network_config(cls.backend)
        c.start_all()
        for host in c.hosts:
            cls.prepare(host)
        yield c


class CommonTests:
    """What every backend must do. Subclasses set `backend`, `tag`, `mtu_overhead` and say
    which address answers on a host (`addr`) and whether a host forwards to a subnet (`peer_known`)."""

    backend = ""
    tag = ""
    mtu_overhead = 0

    @classmethod
    def prepare(cls, host: Host) -> None:
        """What a container runtime would add once the subnet file exists."""

    def addr(self, host: Host) -> str:
        raise NotImplementedError

    def peer_known(self, host: Host, subnet, public_ip: str) -> bool:
        raise NotImplementedError

    def fake_lease(self, public_ip: str) -> dict:
        return {"PublicIP": public_ip}

    def ping_all_pairs(self, hosts) -> None:
        for a, b in itertools.permutations(hosts, 2):
            a.wait_ping(self.addr(b), source=self.addr(a))

    # -- tests ----------------------------------------------------------------

    def test_hosts_get_distinct_leases(self, cluster):
        envs = [h.read_subnet_env() for h in cluster.hosts]
        subnets = [ipaddress.ip_interface(e["FLANNEL_SUBNET"]) for e in envs]
        assert len({s.network for s in subnets}) == 3, envs
        for env, iface in zip(envs, subnets):
            assert env["FLANNEL_NETWORK"] == OVERLAY
            assert iface.network.prefixlen == 24 and iface.network.subnet_of(ipaddress.IPv4Network(OVERLAY))
            assert iface.ip == iface.network.network_address + 1, "FLANNEL_SUBNET: the lease's first address"
            assert env["FLANNEL_MTU"] == str(1500 - self.mtu_overhead)
            assert env["FLANNEL_IPMASQ"] == "false"
        leases = cluster.leases()
        for host, iface in zip(cluster.hosts, subnets):
            attrs = leases[str(iface.network)]
            assert attrs["PublicIP"] == host.ip
            assert attrs.get("BackendType", "") == ("" if self.backend == "udp" else self.backend)

    def test_every_pair_pings(self, cluster):
        self.ping_all_pairs(cluster.hosts)

    def test_iperf3_tcp_transfer(self, cluster):
        client, server = cluster.hosts[0], cluster.hosts[1]
        client.wait_ping(self.addr(server), source=self.addr(client))
        proc = server.iperf3_server(self.addr(server))
        result = client.iperf3_client(self.addr(server), seconds=3, bind=self.addr(client))
        received = result["end"]["sum_received"]
        assert received["bytes"] > 1_000_000, received
        print(f"{self.backend}: iperf3 {received['bits_per_second'] / 1e6:.0f} Mbit/s over 3 s")
        proc.popen.wait(10)


class DestructiveTests:
    """Run last: they stop daemons, restart etcd and remove a host."""

    def test_restart_keeps_subnet_and_traffic_resumes(self, cluster):
        h1, h2, h3 = cluster.hosts
        subnet = subnet_of(h2)
        stamp = h2.subnet_stamp()
        assert h2.stop_flanneld() == 0, h2.log_tail()
        if self.backend != "udp":
            # devices and routes stay behind, so peers keep reaching h2 while it is down
            h1.wait_ping(self.addr(h2), source=self.addr(h1))
        h2.start_flanneld()
        env = h2.wait_subnet_env(newer_than=stamp)
        assert ipaddress.ip_interface(env["FLANNEL_SUBNET"]).network == subnet
        assert cluster.leases()[str(subnet)]["PublicIP"] == h2.ip
        for other in (h1, h3):
            other.wait_ping(self.addr(h2), source=self.addr(other))
            h2.wait_ping(self.addr(other), source=self.addr(h2))

    def test_peers_survive_etcd_restart(self, cluster):
        hosts = cluster.hosts
        peers = {h.name: subnet_of(h) for h in hosts}
        cluster.etcd.stop()
        try:
            # the data path does not need etcd
            for a, b in itertools.permutations(hosts, 2):
                assert a.ping(self.addr(b), count=2, source=self.addr(a)).returncode == 0, cluster.logs()
        finally:
            cluster.etcd.start()
        # the watches come back: a new lease reaches every host, and resyncing kept the peers
        fake = free_subnet(cluster)
        for h in hosts:
            assert not self.peer_known(h, fake, FAKE_PEER_IP)
        code, body = cluster.etcd_request(
            "PUT", f"/coreos.com/network/subnets/{fake.network_address}-24",
            {"value": json.dumps(self.fake_lease(FAKE_PEER_IP)), "ttl": "600"},
        )
        assert code == 201, body
        for h in hosts:
            wait_for(lambda: self.peer_known(h, fake, FAKE_PEER_IP), 60, f"{h.name} to learn lease {fake}")
        for h in hosts:
            for other in hosts:
                if other is not h:
                    assert self.peer_known(h, peers[other.name], other.ip), f"{h.name} lost {other.name}"
        cluster.revoke_lease(str(fake))
        for h in hosts:
            wait_for(lambda: not self.peer_known(h, fake, FAKE_PEER_IP), 30, f"{h.name} to drop {fake}")
        self.ping_all_pairs(hosts)

    def test_host_leaving_for_good_disappears(self, cluster):
        h1, h2, h3 = cluster.hosts
        gone = subnet_of(h3)
        assert h3.stop_flanneld() == 0, h3.log_tail()
        cluster.revoke_lease(str(gone))
        for h in (h1, h2):
            wait_for(lambda: not self.peer_known(h, gone, h3.ip), 30, f"{h.name} to drop {h3.name}'s {gone}")
        self.check_peer_gone(h1, h2, h3)
        h1.wait_ping(self.addr(h2), source=self.addr(h1))
        h2.wait_ping(self.addr(h1), source=self.addr(h2))

    def check_peer_gone(self, *hosts: Host) -> None:
        """Backend-specific leftovers of a removed peer (beyond `peer_known`)."""


# ---------------------------------------------------------------------------
# udp


class UdpChecks:
    def test_udp_device_and_route(self, cluster):
        for h in cluster.hosts:
            subnet = subnet_of(h)
            (link,) = h.json("ip", "-d", "addr", "show", "dev", "flannel0")
            assert link["mtu"] == 1472 and "UP" in link["flags"], link
            assert link["linkinfo"]["info_kind"] == "tun", link
            addrs = [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"]
            assert addrs == [(str(subnet.network_address), 16)], addrs
            route = route_to(h, OVERLAY)
            assert route is not None and route["dev"] == "flannel0", h.routes()

    def test_ttl_is_decremented_on_both_sides(self, cluster):
        h1, h2 = cluster.hosts[:2]
        out = h1.wait_ping(self.addr(h2)).stdout
        assert "ttl=62" in out, out

    def test_unknown_destination_gets_net_unreachable(self, cluster):
        target = free_subnet(cluster).network_address + 1
        out = cluster.hosts[0].ping(str(target))
        assert out.returncode != 0
        assert "Destination Net Unreachable" in out.stdout, out.stdout + out.stderr

    def test_mtu_sized_packets_pass_larger_are_refused(self, cluster):
        h1, h2 = cluster.hosts[:2]
        mtu = int(h1.read_subnet_env()["FLANNEL_MTU"])
        h1.wait_ping(self.addr(h2), size=mtu - 28, dont_fragment=True)
        out = h1.ping(self.addr(h2), size=mtu - 27, dont_fragment=True)
        assert out.returncode != 0
        assert "message too long" in (out.stdout + out.stderr).lower(), out.stdout + out.stderr


class TestUdp(DestructiveTests, UdpChecks, CommonTests):
    backend, tag, mtu_overhead = "udp", "u", 28

    def addr(self, host: Host) -> str:
        return str(subnet_of(host).network_address)  # flannel0's address

    def peer_known(self, host: Host, subnet, public_ip: str) -> bool:
        # the proxy answers a subnet it has no route for with ICMP net-unreachable
        out = host.ping(str(subnet.network_address + 1), wait=1)
        return "Net Unreachable" not in out.stdout


# ---------------------------------------------------------------------------
# vxlan and host-gw: flanneld puts no address on a bridge, so each host gets a cni0 holding
# FLANNEL_SUBNET, as docker or a CNI plugin would; pings go between those addresses.


class BridgeHost:
    @classmethod
    def prepare(cls, host: Host) -> None:
        host.add_bridge_address(host.read_subnet_env()["FLANNEL_SUBNET"])

    def addr(self, host: Host) -> str:
        return str(subnet_of(host).network_address + 1)


class VxlanChecks:
    def test_vxlan_device_and_peer_entries(self, cluster):
        leases = cluster.leases()
        for h in cluster.hosts:
            subnet = subnet_of(h)
            (link,) = h.json("ip", "-d", "addr", "show", "dev", "flannel.1")
            info = link["linkinfo"]["info_data"]
            assert info["id"] == 1 and info["port"] == 8472 and not info.get("learning", False), info
            assert info["local"] == h.ip, info
            assert link["mtu"] == 1450
            assert leases[str(subnet)]["BackendData"]["VtepMAC"] == link["address"]
            assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"] == [
                (str(subnet.network_address), 32)
            ]
            assert route_to(h, subnet) is None or route_to(h, subnet)["dev"] != "flannel.1"
            for peer in cluster.hosts:
                if peer is not h:
                    self.check_peer_entries(h, subnet_of(peer), peer.ip, leases[str(subnet_of(peer))])

    def check_peer_entries(self, host: Host, subnet, public_ip: str, lease: dict) -> None:
        mac = lease["BackendData"]["VtepMAC"]
        route = route_to(host, subnet)
        assert route is not None, host.routes()
        assert route["gateway"] == str(subnet.network_address) and route["dev"] == "flannel.1", route
        assert "onlink" in route.get("flags", []), route
        neigh = [n for n in host.json("ip", "-4", "neigh", "show", "dev", "flannel.1")
                 if n["dst"] == str(subnet.network_address)]
        assert neigh and neigh[0]["lladdr"] == mac and "PERMANENT" in neigh[0]["state"], neigh
        fdb = [f for f in host.json("bridge", "fdb", "show", "dev", "flannel.1") if f["mac"] == mac]
        assert fdb and fdb[0]["dst"] == public_ip and "permanent" in fdb[0].get("state", ""), fdb


class TestVxlan(DestructiveTests, VxlanChecks, BridgeHost, CommonTests):
    backend, tag, mtu_overhead = "vxlan", "v", 50

    def fake_lease(self, public_ip: str) -> dict:
        return {"PublicIP": public_ip, "BackendType": "vxlan", "BackendData": {"VtepMAC": FAKE_VTEP_MAC}}

    def peer_known(self, host: Host, subnet, public_ip: str) -> bool:
        route = route_to(host, subnet)
        return route is not None and route.get("dev") == "flannel.1"

    def check_peer_gone(self, h1: Host, h2: Host, gone: Host) -> None:
        mac = gone.json("ip", "link", "show", "flannel.1")[0]["address"]
        for h in (h1, h2):
            fdb = h.json("bridge", "fdb", "show", "dev", "flannel.1")
            assert all(f["mac"] != mac for f in fdb), fdb
            neigh = h.json("ip", "-4", "neigh", "show", "dev", "flannel.1")
            assert all(n.get("lladdr") != mac for n in neigh), neigh


# ---------------------------------------------------------------------------
# host-gw


class HostGwChecks:
    def test_hostgw_routes_via_peers(self, cluster):
        for h in cluster.hosts:
            own = route_to(h, subnet_of(h))
            assert own is None or own.get("gateway") is None, f"route to own subnet via a peer: {own}"
            for peer in cluster.hosts:
                if peer is not h:
                    route = route_to(h, subnet_of(peer))
                    assert route is not None, h.routes()
                    assert route["gateway"] == peer.ip and route["dev"] == "eth0", route


class TestHostGw(DestructiveTests, HostGwChecks, BridgeHost, CommonTests):
    backend, tag, mtu_overhead = "host-gw", "g", 0

    def fake_lease(self, public_ip: str) -> dict:
        return {"PublicIP": public_ip, "BackendType": "host-gw"}

    def peer_known(self, host: Host, subnet, public_ip: str) -> bool:
        route = route_to(host, subnet)
        return route is not None and route.get("gateway") == public_ip
