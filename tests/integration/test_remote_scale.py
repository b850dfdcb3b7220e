"""Scale of the client/server mode against a real etcd: many watching clients cost etcd one
watch (not one per client), one lease change reaches every parked long poll, and 200
simulated hosts acquire, renew and watch through one server without errors while acquires
still get answered promptly."""

import threading
import time
from ipaddress import IPv4Address

import pytest

from flannel.remote.client import RemoteManager
from flannel.subnet.models import LeaseAttrs
from tests.support.remote import CountingManager, attrs, local_manager, put_config, running_server

pytestmark = pytest.mark.needs_etcd


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def parked(srv, count):
    """True once `count` requests are inside the server (the long polls)."""
    return wait_for(lambda: srv.app._active >= count)


def test_many_watchers_cost_etcd_one_watch(etcd, prefix):
    put_config(etcd, prefix)
    counting = CountingManager(local_manager(etcd, prefix))
    watchers = 60
    with running_server(counting) as srv:
        client = RemoteManager(f"127.0.0.1:{srv.port}")
        direct = local_manager(etcd, prefix)
        cursor = client.watch_leases("", None, 5).cursor
        got = []
        threads = [threading.Thread(target=lambda: got.append(client.watch_leases("", cursor, 20)))
                   for _ in range(watchers)]
        for t in threads:
            t.start()
        assert parked(srv, watchers)
        before = counting.total
        lease = direct.acquire_lease("", attrs(204))
        for t in threads:
            t.join(30)
        assert len(got) == watchers
        assert all([e.lease.subnet for e in r.events] == [lease.subnet] for r in got)
        print(f"\n{watchers} watchers: {counting.total} upstream watch calls in all, "
              f"{counting.total - before} for the last change, at most {counting.peak} at once")
        assert counting.peak == 1  # one etcd watch for the network, however many clients
        assert counting.total - before <= 3
        assert counting.total < watchers


def test_two_hundred_hosts_acquire_renew_and_watch(etcd, prefix):
    put_config(etcd, prefix)
    hosts = 200
    with running_server(local_manager(etcd, prefix)) as srv:
        remote = f"127.0.0.1:{srv.port}"
        errors, leases, events = [], {}, {}
        gate = threading.Semaphore(25)  # bounded bursts of acquires, as hosts boot in waves
        parked_now = threading.Barrier(hosts + 1)
        marker_ip = attrs_of(hosts + 10).public_ip

        def host(n):
            client = RemoteManager(remote)
            try:
                with gate:
                    lease = client.acquire_lease("", attrs_of(n))
                    leases[n] = client.renew_lease("", lease)
                cursor = client.watch_leases("", None, 5).cursor
                parked_now.wait(60)
                seen = set()
                deadline = time.monotonic() + 60
                while marker_ip not in seen:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"host {n} never saw the marker lease")
                    result = client.watch_leases("", cursor, 20)
                    cursor = result.cursor
                    seen |= {e.lease.attrs.public_ip for e in result.events}
                    seen |= {l.attrs.public_ip for l in result.snapshot or ()}
                events[n] = seen
            except Exception as exc:  # collected and asserted below
                errors.append((n, exc))
                parked_now.abort()
            finally:
                client.close()

        threads = [threading.Thread(target=host, args=(n,), name=f"host-{n}") for n in range(hosts)]
        for t in threads:
            t.start()
        parked_now.wait(120)
        assert parked(srv, hosts)
        # with every host parked in a long poll, an acquire still gets answered
        began = time.monotonic()
        extra = RemoteManager(remote).acquire_lease("", attrs_of(hosts + 10))
        latency = time.monotonic() - began
        for t in threads:
            t.join(120)
        print(f"\n{hosts} hosts parked: acquire answered in {latency * 1000:.0f} ms")
        assert errors == []
        assert len({l.subnet for l in leases.values()}) == hosts
        assert len(events) == hosts
        assert latency < 10  # generous: the point is that it is answered at all
        assert extra.attrs.public_ip == marker_ip


def attrs_of(n):
    """Distinct PublicIPs for up to 250 * 250 hosts."""
    return LeaseAttrs(IPv4Address(f"192.168.{100 + n // 250}.{1 + n % 250}"))
