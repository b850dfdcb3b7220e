"""Backend.sync against a real kernel, in a namespace this module creates (prefix fsw): a
restarted backend removes what departed peers left behind, and leaves current peers, our
own subnet, routes outside the overlay and entries flannel never makes alone. Also: a vxlan
peer the kernel refused is programmed by the re-check thread once the kernel accepts it, and
a backend that starts where vxlan ran before removes the peer routes vxlan left."""

import contextlib
import os
import time
import uuid
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel.errors import BackendError
from flannel.subnet.config import NetworkConfig
from flannel.subnet.models import Event, Lease, LeaseAttrs
from tests.support.nsagent import STOP, NsAgent, ip_json, netns, sh

pytestmark = [
    pytest.mark.needs_root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

NL = "flannel.dataplane.netlink:"
MAC_B, MAC_C, MAC_X = "2e:aa:00:00:00:02", "2e:aa:00:00:00:03", "2e:aa:00:00:00:0f"
OWN = "10.10.1.0/24"


def config(btype, **backend):
    return NetworkConfig.parse({"Network": "10.10.0.0/16", "Backend": {"Type": btype, **backend}})


def lease(subnet, public_ip, btype, mac=None):
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(public_ip), btype, {"VtepMAC": mac} if mac else None))


def added(*leases):
    return [Event("added", item) for item in leases]


def routes(ns):
    return {r["dst"]: (r.get("gateway"), r["dev"]) for r in ip_json(ns, "-4 route show")}


@contextlib.contextmanager
def bridged_host():
    """A namespace whose bridge br0 (192.168.77.1/24) is the external interface, a cni0
    bridge holding our subnet's first address, and an agent inside."""
    with netns(f"fsw{uuid.uuid4().hex[:6]}") as ns:
        sh(ns, "ip link add br0 type bridge && ip addr add 192.168.77.1/24 dev br0 && ip link set br0 up"
               " && ip link add cni0 type bridge && ip addr add 10.10.1.1/24 dev cni0 && ip link set cni0 up")
        with contextlib.closing(NsAgent(ns)) as agent:
            yield agent


@pytest.fixture(scope="module")
def host():
    with bridged_host() as agent:
        yield agent


def restarted(agent, key, cls, btype, own_lease, **options):
    """A backend as a restarted flanneld makes it: new object, existing kernel state."""
    ext = agent.call(NL + "lookup_external_interface", "br0", None)
    agent.new(key, cls, ext, config(btype, **options))
    agent.invoke(key, "lease_attrs")
    agent.invoke(key, "start", own_lease, STOP)


def test_hostgw_sync_removes_routes_of_departed_peers_only(host):
    ns = host.ns
    # left by an earlier flanneld: a current peer, a departed one; and routes that are not flannel's
    sh(ns, "ip route add 10.10.2.0/24 via 192.168.77.2 dev br0"
           " && ip route add 10.10.3.0/24 via 192.168.77.3 dev br0"
           " && ip route add 10.20.3.0/24 via 192.168.77.3 dev br0"  # outside the overlay
           " && ip route add 10.10.4.0/25 via 192.168.77.4 dev br0"  # not SubnetLen long
           " && ip route add 10.10.5.0/24 dev br0")  # no gateway
    before = routes(ns)
    peer = lease("10.10.2.0/24", "192.168.77.2", "host-gw")
    restarted(host, "hg", "flannel.backend.hostgw:HostGwBackend", "host-gw", lease(OWN, "192.168.77.1", "host-gw"))
    host.invoke("hg", "sync", [peer])
    host.invoke("hg", "apply", added(peer))
    after = routes(ns)
    assert "10.10.3.0/24" not in after
    assert after == {dst: r for dst, r in before.items() if dst != "10.10.3.0/24"}
    assert after[OWN] == (None, "cni0") and after["10.10.2.0/24"] == ("192.168.77.2", "br0")
    # an empty peer set sweeps the last peer route too, and still nothing else
    host.invoke("hg", "sync", [])
    assert routes(ns) == {dst: r for dst, r in after.items() if dst != "10.10.2.0/24"}
    sh(ns, "ip route del 10.20.3.0/24 && ip route del 10.10.4.0/25 && ip route del 10.10.5.0/24")


def vxlan_state(ns, dev):
    neigh = {n["dst"]: n["lladdr"] for n in ip_json(ns, f"neigh show dev {dev}")
             if "PERMANENT" in n.get("state", [])}
    fdb = sorted((f["mac"], f["dst"]) for f in ip_json(ns, f"fdb show dev {dev}", tool="bridge") if "dst" in f)
    return neigh, fdb, {dst: r for dst, r in routes(ns).items() if r[1] == dev}


def test_vxlan_sync_removes_entries_of_departed_peers_only(host):
    ns, dev, cls = host.ns, "flannel.1", "flannel.backend.vxlan:VxlanBackend"
    own = lease(OWN, "192.168.77.1", "vxlan", "aa:aa:aa:aa:aa:aa")
    peer_b = lease("10.10.2.0/24", "192.168.77.2", "vxlan", MAC_B)
    peer_c = lease("10.10.3.0/24", "192.168.77.3", "vxlan", MAC_C)
    # the earlier flanneld knew B and C
    restarted(host, "vx-old", cls, "vxlan", own)
    host.invoke("vx-old", "apply", added(peer_b, peer_c))
    # entries on our device that are not a peer's: never removed
    sh(ns, f"ip neigh add 172.16.0.1 lladdr {MAC_X} dev {dev} nud permanent"
           f" && ip neigh add 10.10.4.7 lladdr {MAC_X} dev {dev} nud permanent"
           f" && ip route add 172.16.5.0/24 via 10.10.2.0 dev {dev} onlink")
    neigh, fdb, dev_routes = vxlan_state(ns, dev)
    assert "10.10.3.0/24" in dev_routes and neigh["10.10.3.0"] == MAC_C and (MAC_C, "192.168.77.3") in fdb
    others = routes(ns)

    # restarted while C left for good: the first snapshot holds B only
    restarted(host, "vx", cls, "vxlan", own)
    host.invoke("vx", "sync", [peer_b])
    host.invoke("vx", "apply", added(peer_b))
    neigh, fdb, dev_routes = vxlan_state(ns, dev)
    assert neigh == {"10.10.2.0": MAC_B, "172.16.0.1": MAC_X, "10.10.4.7": MAC_X}
    assert fdb == [(MAC_B, "192.168.77.2")]
    assert dev_routes == {"10.10.2.0/24": ("10.10.2.0", dev), "172.16.5.0/24": ("10.10.2.0", dev)}
    assert routes(ns) == {dst: r for dst, r in others.items() if dst != "10.10.3.0/24"}
    assert "10.10.1.0" in sh(ns, f"ip -4 addr show dev {dev}")  # our own address stays


def test_vxlan_peer_refused_by_the_kernel_is_retried(host):
    ns, dev = host.ns, "flannel.5"
    own = lease(OWN, "192.168.77.1", "vxlan", "aa:aa:aa:aa:aa:aa")
    peer = lease("10.10.6.0/24", "192.168.77.6", "vxlan", MAC_B)
    restarted(host, "vxr", "flannel.backend.vxlan:VxlanBackend", "vxlan", own, VNI=5)
    sh(ns, f"ip link set {dev} down")  # the kernel refuses a route via a device that is down
    with pytest.raises(BackendError, match="10.10.6.0/24"):
        host.invoke("vxr", "apply", added(peer))
    assert "10.10.6.0/24" not in vxlan_state(ns, dev)[2]
    sh(ns, f"ip link set {dev} up")
    deadline = time.monotonic() + 10  # CHECK_INTERVAL is 3 s
    while "10.10.6.0/24" not in vxlan_state(ns, dev)[2] and time.monotonic() < deadline:
        time.sleep(0.2)
    neigh, fdb, dev_routes = vxlan_state(ns, dev)
    assert dev_routes.get("10.10.6.0/24") == ("10.10.6.0", dev), "the refused peer was not retried"
    assert neigh["10.10.6.0"] == MAC_B and (MAC_B, "192.168.77.6") in fdb
    assert host.invoke("vxr", "recheck") == 0  # nothing left to retry or restore


def test_vxlan_entries_that_go_missing_are_restored(host):
    ns, dev = host.ns, "flannel.7"
    own = lease(OWN, "192.168.77.1", "vxlan", "aa:aa:aa:aa:aa:aa")
    peer = lease("10.10.8.0/24", "192.168.77.8", "vxlan", MAC_C)
    restarted(host, "vxm", "flannel.backend.vxlan:VxlanBackend", "vxlan", own, VNI=7)
    host.invoke("vxm", "apply", added(peer))
    want = vxlan_state(ns, dev)
    assert want[2]["10.10.8.0/24"] == ("10.10.8.0", dev) and want[0]["10.10.8.0"] == MAC_C

    def restored():
        deadline = time.monotonic() + 10  # CHECK_INTERVAL is 3 s
        while vxlan_state(ns, dev) != want and time.monotonic() < deadline:
            time.sleep(0.2)
        return vxlan_state(ns, dev)

    # someone deletes every entry of the peer, or points the neighbour elsewhere
    sh(ns, f"ip route del 10.10.8.0/24 dev {dev} && ip neigh del 10.10.8.0 dev {dev}"
           f" && bridge fdb del {MAC_C} dev {dev} dst 192.168.77.8")
    assert "10.10.8.0/24" not in vxlan_state(ns, dev)[2]
    assert restored() == want, "deleted vxlan entries were not restored"
    sh(ns, f"ip neigh replace 10.10.8.0 lladdr {MAC_X} dev {dev} nud permanent")
    assert restored() == want, "a changed neighbour was not put back"
    # the kernel drops the routes through a device that goes down
    sh(ns, f"ip link set {dev} down && ip link set {dev} up")
    assert "10.10.8.0/24" not in vxlan_state(ns, dev)[2]
    assert restored() == want, "routes were not restored after the device went down and up"
    assert host.invoke("vxm", "recheck") == 0  # all in place: nothing to do


SWITCHED = {  # the backend now: the routes the old backends left that its start removes
    "udp": {"10.10.2.0/24", "10.10.3.0/24", "10.10.4.0/24"},
    "host-gw": {"10.10.2.0/24", "10.10.3.0/24"},
    # alloc keeps routes via the external interface: a routing tool's look the same
    "alloc": {"10.10.2.0/24", "10.10.3.0/24"},
}
CLASSES = {"udp": "flannel.backend.udp:UdpBackend", "host-gw": "flannel.backend.hostgw:HostGwBackend",
           "alloc": "flannel.backend.alloc:AllocBackend"}


@pytest.mark.parametrize("now", SWITCHED)
def test_a_backend_switch_removes_the_peer_routes_the_old_backend_left(now):
    """The network ran vxlan (peers B and C on flannel.1; host-gw before that left D's route
    on br0), its config now names another backend and flanneld restarts. Another network of
    this host runs vxlan on flannel.2; and there are routes no backend made."""
    with bridged_host() as agent:
        ns, dev = agent.ns, "flannel.1"
        restarted(agent, "old", "flannel.backend.vxlan:VxlanBackend", "vxlan",
                  lease(OWN, "192.168.77.1", "vxlan", "aa:aa:aa:aa:aa:aa"))
        agent.invoke("old", "apply", added(lease("10.10.2.0/24", "192.168.77.2", "vxlan", MAC_B),
                                           lease("10.10.3.0/24", "192.168.77.3", "vxlan", MAC_C)))
        agent.invoke("old", "stop")
        sh(ns, "ip route add 10.10.4.0/24 via 192.168.77.4 dev br0"  # host-gw's
               " && ip link add flannel.2 type vxlan id 2 dstport 8472 local 192.168.77.1 dev br0 nolearning"
               " && ip link set flannel.2 up && ip route add 10.20.2.0/24 via 10.20.2.0 dev flannel.2 onlink"
               " && ip route add 10.20.3.0/24 via 192.168.77.3 dev br0"  # the other network's host-gw
               " && ip route add 172.16.5.0/24 via 192.168.77.9 dev br0"  # outside every overlay
               " && ip route add 10.10.5.0/25 via 192.168.77.5 dev br0"  # not SubnetLen long
               " && ip route add 10.10.6.0/24 dev br0")  # no gateway
        before = routes(ns)
        assert before["10.10.2.0/24"] == ("10.10.2.0", dev) and before["10.10.3.0/24"] == ("10.10.3.0", dev)

        restarted(agent, "new", CLASSES[now], now, lease(OWN, "192.168.77.1", now))
        after = routes(ns)
        want = {dst: r for dst, r in before.items() if dst not in SWITCHED[now]}
        if now == "udp":
            want["10.10.0.0/16"] = (None, "flannel0")
        assert after == want
        # the old device stays, with its neighbours: harmless once no route points into it
        assert vxlan_state(ns, dev)[0] == {"10.10.2.0": MAC_B, "10.10.3.0": MAC_C}
        # a restart of the new backend finds nothing more to remove
        agent.invoke("new", "stop")
        restarted(agent, "again", CLASSES[now], now, lease(OWN, "192.168.77.1", now))
        assert routes(ns) == want
