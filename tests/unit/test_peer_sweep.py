"""Backend.sync of the kernel backends against a faked netlink adapter: which entries of a
kernel dump count as left behind by departed peers, and that nothing else is touched (our
own subnet, current peers, routes outside the overlay, other links, routes without a
gateway), and the sweep a backend's start makes of the peer routes another backend of the
network left (a backend switch). The same sweeps run against a real kernel in
tests/integration/test_peer_sweep.py, and a switch of real daemons in
tests/e2e/test_e2e_backend_switch.py."""

from ipaddress import IPv4Address, IPv4Network

import logging

import pytest

from flannel.backend import peers, udp
from flannel.backend.alloc import AllocBackend
from flannel.backend.base import ExternalInterface
from flannel.backend.hostgw import HostGwBackend
from flannel.backend.vxlan import VxlanBackend
from flannel.dataplane import netlink
from flannel.dataplane.kstate import KernelState, Route
from flannel.errors import BackendError
from flannel.subnet.config import NetworkConfig
from flannel.subnet.models import ADDED, Event, Lease, LeaseAttrs

EXT = ExternalInterface("eth0", 2, IPv4Address("192.168.77.1"), IPv4Address("192.168.77.1"), 1500)
DEV = 10  # the vxlan device's index
MAC_B, MAC_C = "2e:aa:00:00:00:02", "2e:aa:00:00:00:03"
N = IPv4Network
A = IPv4Address


def config(btype, subnet_len=24, **backend):
    return NetworkConfig.parse({"Network": "10.10.0.0/16", "SubnetLen": subnet_len,
                                "Backend": {"Type": btype, **backend}})


def lease(subnet, ip, btype, mac=None):
    return Lease(N(subnet), LeaseAttrs(A(ip), btype, {"VtepMAC": mac} if mac else None))


def route(dst, gateway, oif, onlink=False):
    return Route(N(dst), oif, A(gateway) if gateway else None, onlink)


class FakeNetlink:
    """read_state answers with `state`; the remove_* functions record and update it."""

    def __init__(self, monkeypatch, state, refuse=(), devices=None):
        self.state, self.refuse, self.removed = state, set(refuse), []
        monkeypatch.setattr(netlink, "read_state", lambda index=None: self.state)
        # {index: name} of the flannel.<N> vxlan devices
        monkeypatch.setattr(netlink, "flannel_vxlan_links", lambda: dict(devices or {}))
        monkeypatch.setattr(netlink, "remove_route", self.remove_route)
        monkeypatch.setattr(netlink, "remove_neighbour", self.remove_neighbour)
        monkeypatch.setattr(netlink, "remove_fdb", self.remove_fdb)

    def remove_route(self, dst, oif=None, gateway=None, state=None):
        if str(dst) in self.refuse:
            raise BackendError(f"failed to remove route {dst}: Operation not permitted")
        for old in state.routes_to(dst, oif):
            state.forget_route(old)
        self.removed.append(("route", str(dst), oif, str(gateway)))
        return True

    def remove_neighbour(self, index, ip, state=None):
        state.neighbours.pop(ip)
        self.removed.append(("neigh", index, str(ip)))
        return True

    def remove_fdb(self, index, mac, dst=None, state=None):
        state.forget_fdb(mac, dst)
        self.removed.append(("fdb", index, mac, str(dst)))
        return True


def kernel_routes():
    """Our own subnet, a current peer, one gone, and lookalikes that are not flannel's."""
    return [
        route("10.10.1.0/24", "192.168.77.9", EXT.index),  # our own subnet: never
        route("10.10.2.0/24", "192.168.77.2", EXT.index),  # current peer
        route("10.10.3.0/24", "192.168.77.3", EXT.index),  # peer gone: swept
        route("10.20.3.0/24", "192.168.77.3", EXT.index),  # outside the overlay
        route("10.10.4.0/25", "192.168.77.4", EXT.index),  # not SubnetLen long
        route("10.10.5.0/24", None, EXT.index),  # no gateway: e.g. an address's prefix
        route("10.10.6.0/24", "192.168.78.6", 3),  # another link
        route("0.0.0.0/0", "192.168.77.254", EXT.index),  # the default route
    ]


def test_hostgw_sync_removes_only_routes_of_departed_peers(monkeypatch):
    fake = FakeNetlink(monkeypatch, KernelState.of(kernel_routes(), {}, []))
    backend = HostGwBackend(EXT, config("host-gw"))
    backend.lease = lease("10.10.1.0/24", "192.168.77.1", "host-gw")
    backend._routes = {N("10.10.2.0/24"): A("192.168.77.2"), N("10.10.3.0/24"): A("192.168.77.3")}
    backend.sync([
        lease("10.10.2.0/24", "192.168.77.2", "host-gw"),
        lease("10.10.1.0/24", "192.168.77.1", "host-gw"),  # ours, should it slip through
    ])
    assert fake.removed == [("route", "10.10.3.0/24", EXT.index, "192.168.77.3")]
    # the check loop must not bring the swept route back
    assert backend._routes == {N("10.10.2.0/24"): A("192.168.77.2")}
    assert sorted(map(str, fake.state.routes)) == sorted(
        str(r.dst) for r in kernel_routes() if str(r.dst) != "10.10.3.0/24")


def test_hostgw_sync_sweeps_leases_it_cannot_use(monkeypatch):
    """A lease of another backend type or with our own public IP gets no route from apply,
    so a route to it is a leftover too."""
    state = KernelState.of([route("10.10.7.0/24", "192.168.77.7", EXT.index),
                            route("10.10.8.0/24", "192.168.77.1", EXT.index)], {}, [])
    fake = FakeNetlink(monkeypatch, state)
    backend = HostGwBackend(EXT, config("host-gw"))
    backend.sync([lease("10.10.7.0/24", "192.168.77.7", "vxlan", MAC_B),
                  lease("10.10.8.0/24", "192.168.77.1", "host-gw")])
    assert sorted(r[1] for r in fake.removed) == ["10.10.7.0/24", "10.10.8.0/24"]


def test_hostgw_sync_keeps_going_after_a_refusal_and_reports_it(monkeypatch):
    state = KernelState.of([route("10.10.3.0/24", "192.168.77.3", EXT.index),
                            route("10.10.4.0/24", "192.168.77.4", EXT.index)], {}, [])
    fake = FakeNetlink(monkeypatch, state, refuse={"10.10.3.0/24"})
    with pytest.raises(BackendError, match="10.10.3.0/24"):
        HostGwBackend(EXT, config("host-gw")).sync([])
    assert [r[1] for r in fake.removed] == ["10.10.4.0/24"]


def vxlan_state():
    routes = kernel_routes() + [
        route("10.10.2.0/24", "10.10.2.0", DEV, onlink=True),
        route("10.10.3.0/24", "10.10.3.0", DEV, onlink=True),
        route("10.10.9.0/24", "192.168.77.9", EXT.index),  # a direct route (DirectRouting)
    ]
    neighbours = {
        A("10.10.2.0"): MAC_B,  # current peer
        A("10.10.3.0"): MAC_C,  # gone
        A("10.10.3.7"): MAC_C,  # not a subnet's first address: never flannel's
        A("172.16.0.0"): MAC_C,  # outside the overlay
    }
    fdb = [(MAC_B, A("192.168.77.2")), (MAC_C, A("192.168.77.3"))]
    return KernelState.of(routes, neighbours, fdb)


@pytest.mark.parametrize("direct", [False, True])
def test_vxlan_sync_removes_entries_of_departed_peers_on_our_device(monkeypatch, direct):
    fake = FakeNetlink(monkeypatch, vxlan_state())
    backend = VxlanBackend(EXT, config("vxlan", DirectRouting=direct))
    backend.dev_index = DEV
    backend.lease = lease("10.10.1.0/24", "192.168.77.1", "vxlan", "aa:aa:aa:aa:aa:aa")
    backend.sync([lease("10.10.2.0/24", "192.168.77.2", "vxlan", MAC_B.upper())])
    expected = [
        ("route", "10.10.3.0/24", DEV, "10.10.3.0"),
        ("neigh", DEV, "10.10.3.0"),
        ("fdb", DEV, MAC_C, "192.168.77.3"),
    ]
    if direct:
        # with DirectRouting the external interface holds peer routes too
        expected[1:1] = [("route", "10.10.3.0/24", EXT.index, "192.168.77.3"),
                         ("route", "10.10.9.0/24", EXT.index, "192.168.77.9")]
    assert fake.removed == expected
    assert fake.state.neighbours == {A("10.10.2.0"): MAC_B, A("10.10.3.7"): MAC_C, A("172.16.0.0"): MAC_C}


def test_vxlan_sync_keeps_a_mac_a_current_peer_still_uses(monkeypatch):
    """A host that moved to another subnet keeps its VTEP MAC: the old subnet's route and
    neighbour go, the forwarding entry stays."""
    fake = FakeNetlink(monkeypatch, vxlan_state())
    backend = VxlanBackend(EXT, config("vxlan"))
    backend.dev_index = DEV
    backend.sync([lease("10.10.2.0/24", "192.168.77.2", "vxlan", MAC_B),
                  lease("10.10.12.0/24", "192.168.77.3", "vxlan", MAC_C)])
    assert fake.removed == [("route", "10.10.3.0/24", DEV, "10.10.3.0"), ("neigh", DEV, "10.10.3.0")]
    assert fake.state.fdb == {MAC_B: [A("192.168.77.2")], MAC_C: [A("192.168.77.3")]}


@pytest.mark.parametrize("spelling", ["vtepmac", "VTEPMAC", "vtepMac"])
def test_vxlan_reads_a_vtep_mac_spelled_in_any_case(monkeypatch, spelling):
    """Go's JSON decoder matches BackendData's field names case-insensitively: such a peer is
    programmed, and a sync keeps its forwarding entry."""
    fake = FakeNetlink(monkeypatch, vxlan_state())
    programmed = []

    def recorder(kind, picked):
        def ensure(*args, **kwargs):
            programmed.append((kind, *(args[i] for i in picked)))
            return True  # "changed", as the real ensure_* functions answer
        return ensure

    monkeypatch.setattr(netlink, "ensure_neighbour", recorder("neigh", (1, 2)))
    monkeypatch.setattr(netlink, "ensure_fdb", recorder("fdb", (1, 2)))
    monkeypatch.setattr(netlink, "ensure_route", recorder("route", (0,)))
    backend = VxlanBackend(EXT, config("vxlan"))
    backend.dev_index = DEV
    backend.lease = lease("10.10.1.0/24", "192.168.77.1", "vxlan", "aa:aa:aa:aa:aa:aa")
    peer = Lease(N("10.10.3.0/24"), LeaseAttrs(A("192.168.77.3"), "vxlan", {spelling: MAC_C.upper()}))
    backend.apply([Event(ADDED, peer)])
    assert programmed == [("neigh", A("10.10.3.0"), MAC_C), ("fdb", MAC_C, A("192.168.77.3")),
                          ("route", N("10.10.3.0/24"))]
    backend.sync([lease("10.10.2.0/24", "192.168.77.2", "vxlan", MAC_B), peer])
    assert fake.removed == [] and fake.state.fdb[MAC_C] == [A("192.168.77.3")]


def test_peer_subnet_and_current_peers_helpers():
    cfg = config("host-gw", subnet_len=26)
    assert peers.peer_subnet_of(cfg, N("10.10.3.64/26"))
    assert not peers.peer_subnet_of(cfg, N("10.10.3.0/24"))
    assert not peers.peer_subnet_of(cfg, N("10.11.3.64/26"))
    kept = peers.current_peers(
        [lease("10.10.0.64/26", "192.168.77.2", "host-gw"), lease("10.10.0.128/26", "192.168.77.3", "udp"),
         lease("10.10.0.192/26", "192.168.77.1", "host-gw"), lease("10.10.1.0/26", "192.168.77.4", "host-gw")],
        N("10.10.1.0/26"), "host-gw", A("192.168.77.1"),
    )
    assert list(map(str, kept)) == ["10.10.0.64/26"]


# -- a backend switch: the peer routes another backend of this network left ----------

DEV2, OTHER_LINK, TUN, CNI = 11, 3, 12, 13
VX2 = ("route", "10.10.2.0/24", DEV, "10.10.2.0")
VX3 = ("route", "10.10.3.0/24", DEV, "10.10.3.0")
HG4 = ("route", "10.10.4.0/24", EXT.index, "192.168.77.4")
LINK7 = ("route", "10.10.7.0/24", OTHER_LINK, "192.168.78.7")


def switch_routes():
    """A host whose network 10.10.0.0/16 ran vxlan on flannel.1 (and host-gw before), next to
    another network's routes (10.20.0.0/16, vxlan on flannel.2 and host-gw) and routes that
    are no backend's."""
    return [
        route("10.10.1.0/24", None, CNI),  # our own subnet's bridge
        route("10.10.1.0/24", "10.10.1.0", DEV, onlink=True),  # our own subnet: never, whatever it is
        route("10.10.2.0/24", "10.10.2.0", DEV, onlink=True),  # vxlan's
        route("10.10.3.0/24", "10.10.3.0", DEV, onlink=True),  # vxlan's
        route("10.10.4.0/24", "192.168.77.4", EXT.index),  # host-gw's (or a DirectRouting one)
        route("10.10.7.0/24", "192.168.78.7", OTHER_LINK),  # a peer route on some other link
        route("10.10.0.0/16", None, TUN),  # udp's overlay route: no gateway
        route("10.10.5.0/25", "192.168.77.5", EXT.index),  # not SubnetLen long
        route("10.10.6.0/24", None, EXT.index),  # no gateway
        route("10.20.2.0/24", "10.20.2.0", DEV2, onlink=True),  # another network's vxlan
        route("10.20.3.0/24", "192.168.77.3", EXT.index),  # another network's host-gw
        route("10.20.4.0/24", "10.20.4.0", DEV, onlink=True),  # another network, on our old device
        route("172.16.0.0/24", "192.168.77.9", EXT.index),  # outside every overlay
        route("0.0.0.0/0", "192.168.77.254", EXT.index),
    ]


def start_udp(monkeypatch, backend, own):
    """UdpBackend.start with stand-ins for the TUN, the socket and the C proxy."""
    class Closable:
        fd = 7

        def fileno(self):
            return 8

        def close(self):
            pass

        def start(self, stop, name):
            pass

    monkeypatch.setattr(udp, "open_tun", lambda name: Closable())
    monkeypatch.setattr(udp, "configure_tun", lambda *args: None)
    monkeypatch.setattr(udp, "Proxy", lambda *args: Closable())
    monkeypatch.setattr(backend, "_bind", Closable)
    backend.start(own, None)


def start_vxlan(monkeypatch, backend, own):
    monkeypatch.setattr(netlink, "ensure_vxlan", lambda spec: DEV)
    monkeypatch.setattr(netlink, "link_mac", lambda index: "aa:aa:aa:aa:aa:aa")
    monkeypatch.setattr(netlink, "ensure_address", lambda *args: None)
    monkeypatch.setattr(netlink, "ensure_link_up", lambda *args: None)
    monkeypatch.setattr(backend._recheck, "start", lambda stop: None)
    backend.start(own, None)


def start_hostgw(monkeypatch, backend, own):
    monkeypatch.setattr(backend._recheck, "start", lambda stop: None)
    backend.start(own, None)


SWITCHES = {
    # backend now: (class, options, how to start it, the routes its start removes)
    "udp": (udp.UdpBackend, {}, start_udp, [VX2, VX3, HG4, LINK7]),
    "vxlan": (VxlanBackend, {}, start_vxlan, [HG4, LINK7]),
    "vxlan-direct": (VxlanBackend, {"DirectRouting": True}, start_vxlan, [LINK7]),
    "host-gw": (HostGwBackend, {}, start_hostgw, [VX2, VX3, LINK7]),
    # alloc leaves routes via other links: they may be the routing tool's that alloc serves
    "alloc": (AllocBackend, {}, lambda mp, backend, own: backend.start(own, None), [VX2, VX3]),
}


@pytest.mark.parametrize("now", SWITCHES)
def test_start_removes_the_peer_routes_another_backend_left(monkeypatch, now):
    cls, options, start, swept = SWITCHES[now]
    btype = now.split("-direct")[0]
    fake = FakeNetlink(monkeypatch, KernelState.of(switch_routes(), {}, []),
                       devices={DEV: "flannel.1", DEV2: "flannel.2"})
    start(monkeypatch, cls(EXT, config(btype, **options)), lease("10.10.1.0/24", "192.168.77.1", btype))
    assert sorted(fake.removed) == sorted(swept)
    left = [r for routes in fake.state.routes.values() for r in routes]
    assert sorted(map(str, left)) == sorted(
        str(r) for r in switch_routes()
        if ("route", str(r.dst), r.oif, str(r.gateway)) not in swept)


def test_foreign_routes_in_multi_network_mode_keep_the_other_networks():
    """Each network sweeps only its own Network's peer routes, however the links are shared."""
    state = KernelState.of(switch_routes(), {}, [])
    other = NetworkConfig.parse({"Network": "10.20.0.0/16", "Backend": {"Type": "udp"}})
    found = peers.foreign_routes(state, other, N("10.20.1.0/24"), own_links=())
    assert sorted(str(r.dst) for r in found) == ["10.20.2.0/24", "10.20.3.0/24", "10.20.4.0/24"]
    # its own subnet stays even when it is routed via a gateway
    assert peers.foreign_routes(state, other, N("10.20.3.0/24"), own_links=(DEV2,)) == [
        route("10.20.4.0/24", "10.20.4.0", DEV, onlink=True)]


def test_sweep_reports_a_vxlan_device_left_without_routes_and_keeps_it(monkeypatch, caplog):
    """flannel.1 loses its last route (the device stays: deleting it is not the sweep's
    job, another network's vxlan backend may use it); flannel.3 keeps another network's
    route, so nothing is said about it."""
    state = KernelState.of([route("10.10.2.0/24", "10.10.2.0", DEV, onlink=True),
                            route("10.10.3.0/24", "10.10.3.0", 14, onlink=True),
                            route("10.20.3.0/24", "10.20.3.0", 14, onlink=True)], {}, [])
    fake = FakeNetlink(monkeypatch, state, devices={DEV: "flannel.1", 14: "flannel.3", DEV2: "flannel.2"})
    monkeypatch.setattr(netlink, "delete_link", lambda index: pytest.fail("a device was deleted"))
    with caplog.at_level(logging.INFO, logger="flannel.backend.peers"):
        assert peers.sweep_other_backends("udp", config("udp"), N("10.10.1.0/24")) == 2
    assert sorted(r[1] for r in fake.removed) == ["10.10.2.0/24", "10.10.3.0/24"]
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if "left in place" in line] == [
        "vxlan device flannel.1 is left in place with no route into it (another network may use it;"
        " `ip link del flannel.1` if none does)"]
    assert any("removed 2 route(s) to peers of 10.10.0.0/16" in line for line in lines)


def test_sweep_logs_a_refusal_and_goes_on(monkeypatch, caplog):
    """A route the kernel will not remove must not keep the data path from starting."""
    state = KernelState.of([route("10.10.2.0/24", "10.10.2.0", DEV, onlink=True),
                            route("10.10.3.0/24", "10.10.3.0", DEV, onlink=True)], {}, [])
    fake = FakeNetlink(monkeypatch, state, refuse={"10.10.2.0/24"}, devices={DEV: "flannel.1"})
    assert peers.sweep_other_backends("udp", config("udp"), N("10.10.1.0/24")) == 1
    assert [r[1] for r in fake.removed] == ["10.10.3.0/24"]
    assert "failed to remove route 10.10.2.0/24 via 10.10.2.0 dev #10 onlink" in caplog.text
    assert "left in place" not in caplog.text  # a route still points into flannel.1

    def unreadable():
        raise BackendError("failed to read kernel state over netlink: No buffer space available")

    monkeypatch.setattr(netlink, "flannel_vxlan_links", unreadable)
    assert peers.sweep_other_backends("udp", config("udp"), N("10.10.1.0/24")) == 0
    assert "cannot look for routes an earlier backend left" in caplog.text
