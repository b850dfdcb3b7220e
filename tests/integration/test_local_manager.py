"""LocalManager + EtcdRegistry against a real etcd: acquire policy, races, renewal,
reservations, leases lost behind our back, out of subnets, the watch API."""

import json
import logging
import threading
from ipaddress import IPv4Address, IPv4Network

import etcd as etcd_lib
import pytest

from flannel.errors import ConfigError, LeaseError, LeaseTakenError, NotFoundError
from flannel.subnet.etcd_registry import EtcdRegistry
from flannel.subnet.local_manager import LocalManager
from flannel.subnet.models import ADDED, REMOVED, Event, LeaseAttrs, Reservation

pytestmark = pytest.mark.needs_etcd

CONFIG = {"Network": "10.10.0.0/16"}


def manager(etcd, prefix, **kwargs):
    return LocalManager(EtcdRegistry([etcd.endpoint], prefix), **kwargs)


def put_config(etcd, prefix, doc=CONFIG):
    etcd.client().write(prefix + "/config", json.dumps(doc))


def attrs(n, backend=""):
    return LeaseAttrs(IPv4Address(f"192.168.77.{n}"), backend)


def node(etcd, prefix, subnet):
    key = f"{prefix}/subnets/{subnet.network_address}-{subnet.prefixlen}"
    return etcd.client().read(key)


def acquire_concurrently(etcd, prefix, hosts):
    barrier = threading.Barrier(hosts)
    leases, errors = {}, []

    def host(n):
        mgr = manager(etcd, prefix)  # each host its own manager and connection pool
        barrier.wait()
        try:
            leases[n] = mgr.acquire_lease("", attrs(n))
        except Exception as exc:  # collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=host, args=(n,), name=f"host-{n}") for n in range(1, hosts + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    return leases


def test_twenty_concurrent_hosts_get_distinct_subnets(etcd, prefix):
    put_config(etcd, prefix)
    leases = acquire_concurrently(etcd, prefix, 20)
    subnets = [lease.subnet for lease in leases.values()]
    assert len(set(subnets)) == 20
    stored = {raw.lease.subnet: raw.lease.attrs.public_ip for raw in
              EtcdRegistry([etcd.endpoint], prefix).get_subnets("")[0]}
    assert stored == {leases[n].subnet: IPv4Address(f"192.168.77.{n}") for n in leases}
    for lease in leases.values():
        assert 86000 < node(etcd, prefix, lease.subnet).ttl <= 86400


def test_crowded_range_races_are_retried(etcd, prefix, caplog):
    """12 hosts for 14 subnets: compare-and-swap races are likely and must be retried."""
    put_config(etcd, prefix, {"Network": "10.10.0.0/16", "SubnetMin": "10.10.1.0", "SubnetMax": "10.10.14.0"})
    caplog.set_level(logging.DEBUG, logger="flannel.subnet.local_manager")
    leases = acquire_concurrently(etcd, prefix, 12)
    assert len({lease.subnet for lease in leases.values()}) == 12
    races = sum("lost a race" in r.getMessage() for r in caplog.records)
    print(f"compare-and-swap races retried: {races}")


def test_restart_reuses_the_lease_and_updates_attrs(etcd, prefix):
    put_config(etcd, prefix)
    first = manager(etcd, prefix).acquire_lease("", attrs(1))
    manager(etcd, prefix).acquire_lease("", attrs(2))
    again = manager(etcd, prefix).acquire_lease("", attrs(1, "host-gw"), prefer=IPv4Network("10.10.200.0/24"))
    assert again.subnet == first.subnet
    assert node(etcd, prefix, first.subnet).value == '{"PublicIP":"192.168.77.1","BackendType":"host-gw"}'


def test_reuse_keeps_a_go_written_value_byte_for_byte(etcd, prefix):
    put_config(etcd, prefix)
    go_value = '{"PublicIP":"192.168.77.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"ae:93:4e:3b:7a:1e"}}'
    etcd.client().write(prefix + "/subnets/10.10.7.0-24", go_value, ttl=600)
    ours = LeaseAttrs(IPv4Address("192.168.77.1"), "vxlan", {"VNI": 1, "VtepMAC": "ae:93:4e:3b:7a:1e"})
    lease = manager(etcd, prefix).acquire_lease("", ours)
    assert lease.subnet == IPv4Network("10.10.7.0/24")
    stored = node(etcd, prefix, lease.subnet)
    assert stored.value == go_value and stored.ttl > 600


def test_incompatible_lease_is_deleted_and_replaced(etcd, prefix):
    put_config(etcd, prefix)
    old = manager(etcd, prefix).acquire_lease("", attrs(1))
    put_config(etcd, prefix, {"Network": "10.10.0.0/16", "SubnetLen": 20})
    new = manager(etcd, prefix).acquire_lease("", attrs(1))
    assert new.subnet.prefixlen == 20
    with pytest.raises(etcd_lib.EtcdKeyNotFound):
        node(etcd, prefix, old.subnet)


def test_leases_of_other_lengths_block_the_subnets_they_overlap(etcd, prefix):
    """A /25 and a /23 that a Go host wrote (another SubnetLen, or one left from an earlier
    config) block every /24 they overlap, also as `prefer`."""
    put_config(etcd, prefix, {"Network": "10.10.0.0/16", "SubnetMin": "10.10.1.0", "SubnetMax": "10.10.4.0"})
    etcd.client().write(prefix + "/subnets/10.10.1.128-25", '{"PublicIP":"192.168.77.8"}', ttl=600)
    etcd.client().write(prefix + "/subnets/10.10.2.0-23", '{"PublicIP":"192.168.77.9"}', ttl=600)
    mgr = manager(etcd, prefix)
    lease = mgr.acquire_lease("", attrs(1), prefer=IPv4Network("10.10.1.0/24"))
    assert lease.subnet == IPv4Network("10.10.4.0/24")
    with pytest.raises(LeaseError, match="out of subnets"):
        mgr.acquire_lease("", attrs(2), prefer=IPv4Network("10.10.3.0/24"))


def test_our_deleted_old_lease_does_not_block_the_subnet_around_it(etcd, prefix):
    put_config(etcd, prefix, {"Network": "10.10.0.0/16", "SubnetMin": "10.10.16.0", "SubnetMax": "10.10.16.0"})
    old = manager(etcd, prefix).acquire_lease("", attrs(1))
    put_config(etcd, prefix, {"Network": "10.10.0.0/16", "SubnetLen": 20,
                              "SubnetMin": "10.10.16.0", "SubnetMax": "10.10.16.0"})
    new = manager(etcd, prefix).acquire_lease("", attrs(1))
    assert new.subnet == IPv4Network("10.10.16.0/20") and old.subnet.subnet_of(new.subnet)


def test_prefer_is_taken_when_free(etcd, prefix):
    put_config(etcd, prefix)
    want = IPv4Network("10.10.42.0/24")
    assert manager(etcd, prefix).acquire_lease("", attrs(1), prefer=want).subnet == want
    other = manager(etcd, prefix).acquire_lease("", attrs(2), prefer=want)
    assert other.subnet != want


def test_renewal_extends_the_ttl_and_keeps_the_value(etcd, prefix):
    put_config(etcd, prefix)
    go_value = '{"PublicIP":"192.168.77.1","PublicIPv6":null,"BackendType":"udp"}'
    etcd.client().write(prefix + "/subnets/10.10.9.0-24", go_value, ttl=120)
    short = manager(etcd, prefix)
    lease = short.watch_lease("", IPv4Network("10.10.9.0/24"), None, 1).snapshot[0]
    before = node(etcd, prefix, lease.subnet)
    renewed = manager(etcd, prefix).renew_lease("", lease)
    after = node(etcd, prefix, lease.subnet)
    assert after.value == go_value  # byte for byte
    assert after.ttl > before.ttl and after.ttl > 86000
    assert after.modifiedIndex > before.modifiedIndex
    assert renewed.expiration > lease.expiration


def test_a_host_moved_by_a_reservation_gives_up_its_old_lease(etcd, prefix):
    """One host, one lease: the old lease would stay routed to the host for a day and come
    back as "ours" (not the reserved subnet) when the reserved one is lost."""
    put_config(etcd, prefix)
    old = manager(etcd, prefix).acquire_lease("", attrs(5))
    pinned = IPv4Network("10.10.50.0/24") if old.subnet != IPv4Network("10.10.50.0/24") \
        else IPv4Network("10.10.51.0/24")
    other = manager(etcd, prefix).acquire_lease("", attrs(6))
    mgr = manager(etcd, prefix)
    mgr.add_reservation("", Reservation(pinned, IPv4Address("192.168.77.5")))
    moved = manager(etcd, prefix).acquire_lease("", attrs(5))
    assert moved.subnet == pinned
    with pytest.raises(etcd_lib.EtcdKeyNotFound):
        node(etcd, prefix, old.subnet)
    assert node(etcd, prefix, other.subnet).value == '{"PublicIP":"192.168.77.6"}'
    # the reservation removed and its key lost later: the host gets the same subnet back
    mgr.remove_reservation("", pinned)
    mgr.revoke_lease("", pinned)
    assert manager(etcd, prefix).acquire_lease("", attrs(5), prefer=pinned).subnet == pinned


def test_reservations(etcd, prefix):
    put_config(etcd, prefix)
    mgr = manager(etcd, prefix)
    pinned = IPv4Network("10.10.50.0/24")
    mgr.add_reservation("", Reservation(pinned, IPv4Address("192.168.77.5")))
    assert mgr.list_reservations("") == [Reservation(pinned, IPv4Address("192.168.77.5"))]
    assert node(etcd, prefix, pinned).ttl is None

    # the reserved host gets it; nobody else does
    lease = manager(etcd, prefix).acquire_lease("", attrs(5, "host-gw"))
    assert lease.subnet == pinned and lease.is_reservation
    assert manager(etcd, prefix).acquire_lease("", attrs(6), prefer=pinned).subnet != pinned
    # renewal never adds a TTL
    renewed = mgr.renew_lease("", lease)
    assert renewed.is_reservation and node(etcd, prefix, pinned).ttl is None
    assert node(etcd, prefix, pinned).value == '{"PublicIP":"192.168.77.5","BackendType":"host-gw"}'

    with pytest.raises(LeaseError, match="not a /24"):
        mgr.add_reservation("", Reservation(IPv4Network("10.11.0.0/24"), IPv4Address("192.168.77.7")))
    holder = mgr.acquire_lease("", attrs(8))
    with pytest.raises(LeaseError, match="held by 192.168.77.8"):
        mgr.add_reservation("", Reservation(holder.subnet, IPv4Address("192.168.77.9")))
    with pytest.raises(NotFoundError, match="is a lease, not a reservation"):
        mgr.remove_reservation("", holder.subnet)
    # pinning a host's current lease turns it into a reservation
    mgr.add_reservation("", Reservation(holder.subnet, IPv4Address("192.168.77.8")))
    assert node(etcd, prefix, holder.subnet).ttl is None

    with pytest.raises(LeaseTakenError, match="192.168.77.5's, not 192.168.77.8's"):
        mgr.remove_reservation("", pinned, holder=IPv4Address("192.168.77.8"))
    # removing a reservation keeps the key, value byte for byte, and puts the lease TTL back
    kept = {s: node(etcd, prefix, s).value for s in (pinned, holder.subnet)}
    mgr.remove_reservation("", pinned, holder=IPv4Address("192.168.77.5"))
    mgr.remove_reservation("", holder.subnet)
    for subnet, value in kept.items():
        after = node(etcd, prefix, subnet)
        assert after.value == value and 86000 < after.ttl <= 86400
    assert mgr.list_reservations("") == []
    # the host keeps its subnet as an ordinary lease
    as_lease = mgr.renew_lease("", lease)
    assert as_lease.subnet == pinned and not as_lease.is_reservation
    with pytest.raises(NotFoundError, match="is a lease, not a reservation"):
        mgr.remove_reservation("", pinned)
    with pytest.raises(NotFoundError, match="no reservation for 10.10.77.0/24"):
        mgr.remove_reservation("", IPv4Network("10.10.77.0/24"))


def test_removing_a_reservation_retries_a_lost_race(etcd, prefix):
    """The holder renews its reservation between our read and our write: the compare-and-swap
    loses, and the retry puts the TTL on the value the holder wrote."""
    put_config(etcd, prefix)
    mgr = manager(etcd, prefix)
    pinned = IPv4Network("10.10.50.0/24")
    mgr.add_reservation("", Reservation(pinned, IPv4Address("192.168.77.5")))
    holder = manager(etcd, prefix)
    read = mgr.registry.get_subnet
    reads = []

    def read_then_renew(network, subnet):
        raw = read(network, subnet)
        if not reads:
            holder.acquire_lease("", attrs(5, "host-gw"))  # rewrites the value, no TTL
        reads.append(raw)
        return raw

    mgr.registry.get_subnet = read_then_renew
    mgr.remove_reservation("", pinned)
    after = node(etcd, prefix, pinned)
    assert len(reads) == 2 and reads[0].modified_index < reads[1].modified_index
    assert after.value == '{"PublicIP":"192.168.77.5","BackendType":"host-gw"}' and after.ttl > 86000


def test_a_reservation_made_during_a_renewal_keeps_no_ttl(etcd, prefix):
    """The admin pins our lease between the renewal's read and its write: the value is the
    same, only the TTL went; the renewal must not put it back."""
    put_config(etcd, prefix)
    mgr = manager(etcd, prefix)
    lease = mgr.acquire_lease("", attrs(1))
    read = mgr.registry.get_subnet
    pinned = []

    def read_then_pin(network, subnet):
        raw = read(network, subnet)
        if not pinned:
            manager(etcd, prefix).add_reservation("", Reservation(subnet, IPv4Address("192.168.77.1")))
            pinned.append(subnet)
        return raw

    mgr.registry.get_subnet = read_then_pin
    renewed = mgr.renew_lease("", lease)
    assert pinned and node(etcd, prefix, lease.subnet).ttl is None
    assert renewed.expiration is None
    assert [r.subnet for r in mgr.list_reservations("")] == [lease.subnet]


def test_revoke_for_a_holder_is_a_compare_and_delete(etcd, prefix):
    put_config(etcd, prefix)
    mgr = manager(etcd, prefix)
    lease = mgr.acquire_lease("", attrs(1))
    with pytest.raises(LeaseTakenError, match="held by 192.168.77.1"):
        mgr.revoke_lease("", lease.subnet, holder=IPv4Address("192.168.77.2"))
    assert json.loads(node(etcd, prefix, lease.subnet).value)["PublicIP"] == "192.168.77.1"
    mgr.revoke_lease("", lease.subnet, holder=IPv4Address("192.168.77.1"))
    with pytest.raises(etcd_lib.EtcdKeyNotFound):
        node(etcd, prefix, lease.subnet)
    with pytest.raises(NotFoundError, match="no longer exists"):
        mgr.revoke_lease("", lease.subnet, holder=IPv4Address("192.168.77.1"))


def test_lease_deleted_behind_our_back(etcd, prefix):
    put_config(etcd, prefix)
    mgr = manager(etcd, prefix)
    lease = mgr.acquire_lease("", attrs(1))
    mgr.revoke_lease("", lease.subnet)
    with pytest.raises(NotFoundError, match="no longer exists"):
        mgr.renew_lease("", lease)
    # another host claims the subnet meanwhile
    taken = manager(etcd, prefix).acquire_lease("", attrs(2), prefer=lease.subnet)
    assert taken.subnet == lease.subnet
    with pytest.raises(LeaseTakenError, match="held by 192.168.77.2"):
        mgr.renew_lease("", lease)


def test_out_of_subnets(etcd, prefix):
    put_config(etcd, prefix, {"Network": "10.10.0.0/16", "SubnetMin": "10.10.3.0", "SubnetMax": "10.10.4.0"})
    mgr = manager(etcd, prefix)
    got = {mgr.acquire_lease("", attrs(n)).subnet for n in (1, 2)}
    assert got == {IPv4Network("10.10.3.0/24"), IPv4Network("10.10.4.0/24")}
    with pytest.raises(LeaseError, match="out of subnets"):
        mgr.acquire_lease("", attrs(3))


def test_missing_and_invalid_config(etcd, prefix):
    mgr = manager(etcd, prefix)
    with pytest.raises(NotFoundError, match="config"):
        mgr.get_network_config("")
    put_config(etcd, prefix, {"Network": "10.10.0.0/16", "SubnetLen": 8})
    with pytest.raises(ConfigError, match=f"{prefix}/config: SubnetLen 8"):
        mgr.acquire_lease("", attrs(1))
    assert EtcdRegistry([etcd.endpoint], prefix).get_subnets("")[0] == []


def test_non_subnet_keys_are_ignored_with_one_warning(etcd, prefix, caplog):
    put_config(etcd, prefix)
    etcd.client().write(prefix + "/subnets/README", "not a lease")
    etcd.client().write(prefix + "/subnets/10.10.3.0-24", "not json")
    mgr = manager(etcd, prefix)
    caplog.set_level(logging.WARNING, logger="flannel.subnet.etcd_registry")
    for n in (1, 2, 3):
        mgr.acquire_lease("", attrs(n))
    warnings = [r.getMessage() for r in caplog.records]
    assert len([w for w in warnings if "README" in w]) == 1
    assert len([w for w in warnings if "10.10.3.0-24" in w]) == 1
    leases = mgr.watch_leases("", None, 1).snapshot
    assert len(leases) == 3 and IPv4Network("10.10.3.0/24") not in {l.subnet for l in leases}


def test_watch_api_maps_etcd_actions(etcd, prefix):
    put_config(etcd, prefix)
    mgr = manager(etcd, prefix)
    mine = mgr.acquire_lease("", attrs(1))
    snap = mgr.watch_leases("", None, 1)
    assert [l.subnet for l in snap.snapshot] == [mine.subnet] and snap.cursor.isdigit()

    # a time-out gives the cursor back unchanged
    idle = mgr.watch_leases("", snap.cursor, 0.3)
    assert idle.events == () and idle.snapshot is None and idle.cursor == snap.cursor

    other = manager(etcd, prefix).acquire_lease("", attrs(2))
    got = mgr.watch_leases("", snap.cursor, 5)
    assert got.events == (Event(ADDED, other),) and int(got.cursor) > int(snap.cursor)
    assert got.events[0].lease.expiration == other.expiration

    renewed = mgr.renew_lease("", mine)  # compareAndSwap -> added
    got2 = mgr.watch_leases("", got.cursor, 5)
    assert got2.events[0].type == ADDED and got2.events[0].lease.expiration == renewed.expiration

    mgr.revoke_lease("", other.subnet)  # delete -> removed, subnet only
    got3 = mgr.watch_leases("", got2.cursor, 5)
    assert got3.events == (Event.removed(other.subnet),)
    assert got3.events[0].to_dict()["lease"]["Attrs"] == {"PublicIP": "0.0.0.0"}

    # expiry -> removed
    etcd.client().write(prefix + "/subnets/10.10.99.0-24", '{"PublicIP":"192.168.77.9"}', ttl=1)
    created = mgr.watch_leases("", got3.cursor, 5)
    assert created.events[0].type == ADDED
    expired = mgr.watch_leases("", created.cursor, 10)
    assert expired.events == (Event.removed(IPv4Network("10.10.99.0/24")),)


def test_watch_one_lease(etcd, prefix):
    put_config(etcd, prefix)
    mgr = manager(etcd, prefix)
    mine = mgr.acquire_lease("", attrs(1))
    snap = mgr.watch_lease("", mine.subnet, None, 1)
    assert snap.snapshot == (mine,)
    manager(etcd, prefix).acquire_lease("", attrs(2))  # another lease: not seen here
    assert mgr.watch_lease("", mine.subnet, snap.cursor, 0.5).events == ()
    renewed = mgr.renew_lease("", mine)
    got = mgr.watch_lease("", mine.subnet, snap.cursor, 5)
    assert got.events == (Event(ADDED, renewed),)
    gone = mgr.watch_lease("", IPv4Network("10.10.250.0/24"), None, 1)
    assert gone.snapshot == () and int(gone.cursor) > 0


def test_watch_networks(etcd, prefix):
    client = etcd.client()
    client.write(prefix + "/blue/config", json.dumps(CONFIG))
    client.write(prefix + "/red/config", json.dumps(CONFIG))
    mgr = manager(etcd, prefix)
    snap = mgr.watch_networks(None, 1)
    assert snap.snapshot == ("blue", "red")
    lease = mgr.acquire_lease("blue", attrs(1))  # not a network change
    assert lease.subnet.subnet_of(IPv4Network("10.10.0.0/16"))
    got = mgr.watch_networks(snap.cursor, 5)
    assert got.events == ()
    client.write(prefix + "/green/config", json.dumps(CONFIG))
    got = mgr.watch_networks(got.cursor, 5)
    assert got.events == (Event(ADDED, network="green"),)
    client.delete(prefix + "/red", recursive=True)
    got = mgr.watch_networks(got.cursor, 5)
    assert got.events == (Event(REMOVED, network="red"),)
    assert mgr.watch_networks(got.cursor, 0.3).events == ()


def test_subnets_directory_deleted_gives_a_snapshot(etcd, prefix):
    put_config(etcd, prefix)
    mgr = manager(etcd, prefix)
    mgr.acquire_lease("", attrs(1))
    etcd.client().write(prefix + "/subnets/extra/x", "a directory under subnets")
    snap = mgr.watch_leases("", None, 1)
    assert len(snap.snapshot) == 1  # the directory is ignored
    etcd.client().delete(prefix + "/subnets", recursive=True)
    got = mgr.watch_leases("", snap.cursor, 5)
    assert got.snapshot == () and got.events == () and int(got.cursor) > int(snap.cursor)
