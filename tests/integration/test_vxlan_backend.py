"""The vxlan backend against a real kernel, inside namespaces this module creates.

One namespace checks the device and the per-peer entries (read back with ip/bridge -j);
two namespaces on a veth pair run a backend each and ping across the overlay.
"""

import os
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel.backend.vxlan import VxlanBackend
from flannel.backend.base import ExternalInterface
from flannel.errors import BackendError, ConfigError
from flannel.subnet.config import NetworkConfig
from flannel.subnet.models import Event, Lease, LeaseAttrs
from tests.support.nsagent import STOP, bridge_host, ip_json, sh, veth_hosts



def root_only(test):
    skip = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")
    return pytest.mark.needs_root(skip(test))


NL = "flannel.dataplane.netlink:"
VX = "flannel.backend.vxlan:VxlanBackend"
MAC_B, MAC_C = "2e:aa:00:00:00:02", "2e:aa:00:00:00:03"


def config(**backend):
    return NetworkConfig.parse({"Network": "10.10.0.0/16", "Backend": {"Type": "vxlan", **backend}})


def lease(subnet, public_ip, mac=None, btype="vxlan", data=None):
    if data is None and mac is not None:
        data = {"VtepMAC": mac}
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(public_ip), btype, data))


def added(*leases):
    return [Event("added", item) for item in leases]


def removed(*subnets):
    return [Event.removed(IPv4Network(s)) for s in subnets]


# -- options (no kernel) ---------------------------------------------------------

EXT = ExternalInterface("eth0", 2, IPv4Address("192.168.77.1"), IPv4Address("192.168.77.1"), 1500)


@pytest.mark.parametrize("name, value", [
    ("VNI", "1"), ("VNI", -1), ("VNI", 1 << 24), ("Port", 70000), ("Port", True),
    ("GBP", "yes"), ("DirectRouting", 1),
])
def test_bad_options_are_refused_naming_the_option(name, value):
    with pytest.raises(ConfigError, match=name):
        VxlanBackend(EXT, config(**{name: value}))


def test_defaults_and_mtu():
    backend = VxlanBackend(EXT, config())
    assert (backend.spec.name, backend.spec.vni, backend.spec.port) == ("flannel.1", 1, 8472)
    assert backend.mtu == 1450
    backend = VxlanBackend(EXT, config(VNI=7, Port=4789, gbp=True, directrouting=True))
    assert (backend.spec.name, backend.spec.port, backend.spec.gbp) == ("flannel.7", 4789, True)
    assert backend.direct_routing


# -- one namespace: device and entries -------------------------------------------

@pytest.fixture(scope="module")
def agent():
    with bridge_host("vx") as agent:
        yield agent


@pytest.fixture(scope="module")
def ns(agent):
    return agent.ns


@pytest.fixture(scope="module")
def ext(agent):
    return agent.call(NL + "lookup_external_interface", "br0", None)


def vxlan_info(ns, dev):
    (link,) = ip_json(ns, f"-d link show {dev}")
    return link["address"], link["linkinfo"]["info_data"], link


def peer_state(ns, dev):
    """(neighbours {ip: mac}, fdb [(mac, dst)], routes {dst: (gateway, dev)}) of `dev`."""
    neigh = {n["dst"]: n["lladdr"] for n in ip_json(ns, f"neigh show dev {dev}")
             if "PERMANENT" in n.get("state", [])}
    fdb = sorted((f["mac"], f["dst"]) for f in ip_json(ns, f"fdb show dev {dev}", tool="bridge")
                 if "dst" in f)
    routes = {r["dst"]: (r.get("gateway"), r["dev"]) for r in ip_json(ns, "-4 route show")
              if r["dst"].startswith("10.10.")}
    return neigh, fdb, routes


@root_only
def test_device_created_reused_and_replaced(ns, agent, ext):
    agent.new("dev1", VX, ext, config(VNI=11))
    attrs = agent.invoke("dev1", "lease_attrs")
    mac, info, _link = vxlan_info(ns, "flannel.11")
    assert attrs == LeaseAttrs(ext.ext_addr, "vxlan", {"VtepMAC": mac})
    assert (info["id"], info["port"], info["local"], info["link"], info["learning"]) == (
        11, 8472, "192.168.77.1", "br0", False)
    # a restart reuses the device: peers keep the MAC they know
    agent.new("dev1b", VX, ext, config(VNI=11))
    assert agent.invoke("dev1b", "lease_attrs").backend_data == {"VtepMAC": mac}
    assert vxlan_info(ns, "flannel.11")[0] == mac
    # another port makes the device incompatible: it is replaced
    agent.new("dev1c", VX, ext, config(VNI=11, Port=4789))
    agent.invoke("dev1c", "lease_attrs")
    assert vxlan_info(ns, "flannel.11")[1]["port"] == 4789


@root_only
def test_start_configures_address_mtu_and_state(ns, agent, ext):
    agent.new("dev2", VX, ext, config(VNI=12))
    agent.invoke("dev2", "lease_attrs")
    agent.invoke("dev2", "start", lease("10.10.1.0/24", "192.168.77.1", "aa:aa:aa:aa:aa:aa"), STOP)
    agent.invoke("dev2", "start", lease("10.10.1.0/24", "192.168.77.1", "aa:aa:aa:aa:aa:aa"), STOP)
    _mac, _info, link = vxlan_info(ns, "flannel.12")
    assert link["mtu"] == ext.mtu - 50 and "UP" in link["flags"]
    (addrs,) = [a["addr_info"] for a in ip_json(ns, "-4 addr show dev flannel.12")]
    assert [(a["local"], a["prefixlen"]) for a in addrs] == [("10.10.1.0", 32)]


@root_only
def test_peer_entries_added_replaced_and_removed(ns, agent, ext):
    dev = "flannel.13"
    agent.new("dev3", VX, ext, config(VNI=13))
    agent.invoke("dev3", "lease_attrs")
    own = lease("10.10.1.0/24", "192.168.77.1", "aa:aa:aa:aa:aa:aa")
    agent.invoke("dev3", "start", own, STOP)
    peer = lease("10.10.2.0/24", "192.168.77.2", MAC_B)
    agent.invoke("dev3", "apply", added(peer, own))
    agent.invoke("dev3", "apply", added(peer))  # a resync: nothing twice
    neigh, fdb, routes = peer_state(ns, dev)
    assert neigh == {"10.10.2.0": MAC_B}
    assert fdb == [(MAC_B, "192.168.77.2")]
    assert routes == {"10.10.2.0/24": ("10.10.2.0", dev)}  # never a route for our own subnet

    # the peer restarts with a new VTEP MAC, then moves to another address
    agent.invoke("dev3", "apply", added(lease("10.10.2.0/24", "192.168.77.2", MAC_C)))
    neigh, fdb, _routes = peer_state(ns, dev)
    assert neigh == {"10.10.2.0": MAC_C} and fdb == [(MAC_C, "192.168.77.2")]
    agent.invoke("dev3", "apply", added(lease("10.10.2.0/24", "192.168.77.9", MAC_C)))
    assert peer_state(ns, dev)[1] == [(MAC_C, "192.168.77.9")]

    # bad BackendData and other backend types are skipped; the good peer in the batch is added
    agent.invoke("dev3", "apply", added(
        lease("10.10.3.0/24", "192.168.77.3", data={"VtepMAC": "nonsense"}),
        lease("10.10.4.0/24", "192.168.77.4", data="garbage"),
        lease("10.10.5.0/24", "192.168.77.5", MAC_B, btype="host-gw"),
        lease("10.10.6.0/24", "192.168.77.6", MAC_B),
    ))
    neigh, fdb, routes = peer_state(ns, dev)
    assert sorted(routes) == ["10.10.2.0/24", "10.10.6.0/24"]
    assert neigh == {"10.10.2.0": MAC_C, "10.10.6.0": MAC_B}

    agent.invoke("dev3", "apply", removed("10.10.2.0/24", "10.10.6.0/24", "10.10.1.0/24"))
    agent.invoke("dev3", "apply", removed("10.10.2.0/24"))
    assert peer_state(ns, dev) == ({}, [], {})
    assert "10.10.1.0" in sh(ns, "ip -4 addr show dev flannel.13")


@root_only
def test_removal_after_restart_finds_the_entries(ns, agent, ext):
    """A removal for a peer programmed by an earlier process still removes everything."""
    agent.new("dev4", VX, ext, config(VNI=14))
    agent.invoke("dev4", "lease_attrs")
    agent.invoke("dev4", "start", lease("10.10.1.0/24", "192.168.77.1", "aa:aa:aa:aa:aa:aa"), STOP)
    agent.invoke("dev4", "apply", added(lease("10.10.7.0/24", "192.168.77.7", MAC_B)))
    agent.new("dev4b", VX, ext, config(VNI=14))
    agent.invoke("dev4b", "lease_attrs")
    agent.invoke("dev4b", "start", lease("10.10.1.0/24", "192.168.77.1", "aa:aa:aa:aa:aa:aa"), STOP)
    agent.invoke("dev4b", "apply", removed("10.10.7.0/24"))
    assert peer_state(ns, "flannel.14") == ({}, [], {})


@root_only
def test_direct_routing_for_peers_on_the_segment(ns, agent, ext):
    dev = "flannel.15"
    agent.new("dev5", VX, ext, config(VNI=15, DirectRouting=True))
    agent.invoke("dev5", "lease_attrs")
    agent.invoke("dev5", "start", lease("10.10.1.0/24", "192.168.77.1", "aa:aa:aa:aa:aa:aa"), STOP)
    agent.invoke("dev5", "apply", added(
        lease("10.10.8.0/24", "192.168.77.8", MAC_B),  # same L2 segment: direct route
        lease("10.10.9.0/24", "172.16.0.9", MAC_C),  # elsewhere: through the VXLAN device
    ))
    neigh, fdb, routes = peer_state(ns, dev)
    assert routes["10.10.8.0/24"] == ("192.168.77.8", "br0")
    assert routes["10.10.9.0/24"] == ("10.10.9.0", dev)
    assert neigh == {"10.10.9.0": MAC_C} and fdb == [(MAC_C, "172.16.0.9")]
    # the peer moves off the segment: the direct route gives way to the overlay entries
    agent.invoke("dev5", "apply", added(lease("10.10.8.0/24", "172.16.0.8", MAC_B)))
    neigh, fdb, routes = peer_state(ns, dev)
    assert routes["10.10.8.0/24"] == ("10.10.8.0", dev)
    assert fdb == [(MAC_B, "172.16.0.8"), (MAC_C, "172.16.0.9")]
    agent.invoke("dev5", "apply", removed("10.10.8.0/24", "10.10.9.0/24"))
    assert peer_state(ns, dev) == ({}, [], {})


@root_only
def test_large_batch_then_a_resync_then_removal(ns, agent, ext):
    """One batch of many peers (one kernel dump per batch) programs each exactly once."""
    dev, count = "flannel.17", 200
    peers = [
        lease(f"10.10.{i}.0/24", f"172.16.{i}.1", f"2e:bb:00:00:00:{i:02x}") for i in range(2, 2 + count)
    ]
    agent.new("dev7", VX, ext, config(VNI=17))
    agent.invoke("dev7", "lease_attrs")
    agent.invoke("dev7", "start", lease("10.10.1.0/24", "192.168.77.1", "aa:aa:aa:aa:aa:aa"), STOP)
    agent.invoke("dev7", "apply", added(*peers))
    agent.invoke("dev7", "apply", added(*peers))
    neigh, fdb, routes = peer_state(ns, dev)
    assert len(neigh) == len(fdb) == len(routes) == count
    assert fdb[0] == ("2e:bb:00:00:00:02", "172.16.2.1")
    # a peer that moved and one that left, in one batch with unchanged ones
    batch = added(*peers[2:], lease("10.10.2.0/24", "172.16.99.1", "2e:bb:00:00:00:02"))
    agent.invoke("dev7", "apply", batch + removed("10.10.3.0/24"))
    neigh, fdb, routes = peer_state(ns, dev)
    assert len(routes) == count - 1 and "10.10.3.0/24" not in routes
    assert ("2e:bb:00:00:00:02", "172.16.99.1") in fdb and len(fdb) == count - 1
    agent.invoke("dev7", "apply", removed(*(str(p.subnet) for p in peers)))
    assert peer_state(ns, dev) == ({}, [], {})


@root_only
def test_kernel_refusal_is_a_backend_error_naming_the_peer(agent, ext):
    agent.new("dev6", VX, ext, config(VNI=16))
    agent.invoke("dev6", "lease_attrs")
    agent.invoke("dev6", "start", lease("10.10.1.0/24", "192.168.77.1", "aa:aa:aa:aa:aa:aa"), STOP)
    sh(agent.ns, "ip link del flannel.16")
    with pytest.raises(BackendError, match="10.10.2.0/24"):
        agent.invoke("dev6", "apply", added(lease("10.10.2.0/24", "192.168.77.2", MAC_B)))


# -- two namespaces: traffic over the overlay --------------------------------------

@pytest.fixture(scope="module")
def pair():
    """Hosts A (192.168.77.1) and B (192.168.77.2) on a veth pair: [(agent, ExternalInterface)]."""
    with veth_hosts("vx") as hosts:
        yield [(a, a.call(NL + "lookup_external_interface", dev, None)) for a, dev in hosts]


def run_pair(pair, key, cfg, subnets):
    """Start a backend on each host for `subnets` and tell each about the other."""
    leases = []
    for (agent, ext), subnet in zip(pair, subnets):
        agent.new(key, VX, ext, cfg)
        attrs = agent.invoke(key, "lease_attrs")
        leases.append(Lease(IPv4Network(subnet), attrs))
        agent.invoke(key, "start", leases[-1], STOP)
    for (agent, _ext), other in zip(pair, reversed(leases)):
        agent.invoke(key, "apply", added(other))
    return leases


def ping(ns, dst):
    return sh(ns, f"ping -c 2 -i 0.2 -W 2 {dst}", check=False)


@root_only
def test_two_hosts_ping_over_vxlan_and_survive_a_restart(pair):
    (agent_a, _), (agent_b, _) = pair
    leases = run_pair(pair, "vx", config(), ["10.10.1.0/24", "10.10.2.0/24"])
    out = ping(agent_a.ns, "10.10.2.0")
    assert " 0% packet loss" in out, out
    tx_before = ip_json(agent_a.ns, "-s link show flannel.1")[0]["stats64"]["tx"]["packets"]
    assert tx_before >= 2  # the pings went through the VXLAN device

    # A restarts: a new backend over the existing device keeps the MAC B knows
    agent_a.new("vx2", VX, pair[0][1], config())
    assert agent_a.invoke("vx2", "lease_attrs") == leases[0].attrs
    agent_a.invoke("vx2", "start", leases[0], STOP)
    agent_a.invoke("vx2", "apply", added(leases[1]))
    assert peer_state(agent_a.ns, "flannel.1")[1] == [
        (leases[1].attrs.backend_data["VtepMAC"], "192.168.77.2")
    ]
    out = ping(agent_b.ns, "10.10.1.0")
    assert " 0% packet loss" in out, out


@root_only
def test_two_hosts_with_direct_routing(pair):
    (agent_a, ext_a), (agent_b, _) = pair
    run_pair(pair, "dr", config(VNI=2, DirectRouting=True), ["10.10.3.0/24", "10.10.4.0/24"])
    routes = peer_state(agent_a.ns, "flannel.2")[2]
    assert routes["10.10.4.0/24"] == ("192.168.77.2", ext_a.name)
    out = ping(agent_a.ns, "10.10.4.0")
    assert " 0% packet loss" in out, out
    assert ip_json(agent_a.ns, "-s link show flannel.2")[0]["stats64"]["tx"]["packets"] == 0
