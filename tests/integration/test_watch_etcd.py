"""LeaseWatcher against a real etcd: recovery after etcd cleared the watcher's history
(> 1000 events behind) and after etcd was stopped and restarted, without losing events."""

import json
import shutil
import threading
import time
from ipaddress import IPv4Address, IPv4Network

import etcd as etcd_lib
import pytest

from flannel.errors import RegistryError
from flannel.subnet.etcd_registry import EtcdRegistry
from flannel.subnet.local_manager import LocalManager
from flannel.subnet.models import ADDED, REMOVED, Event, LeaseAttrs
from flannel.subnet.watch import LeaseWatcher
from tests.support.etcd import EtcdServer

pytestmark = pytest.mark.needs_etcd


class GatedManager:
    """Passes watch calls to a real manager, but after the first one each call waits for
    `gate`: the test holds the watcher parked behind a known cursor while it changes etcd."""

    def __init__(self, manager):
        self.manager = manager
        self.gate = threading.Event()
        self.calls = 0
        self.results = []

    def watch_leases(self, network, cursor, timeout):
        self.calls += 1
        if self.calls > 1:
            self.gate.wait()
        result = self.manager.watch_leases(network, cursor, timeout)
        self.results.append(result)
        return result


class Recorder:
    def __init__(self):
        self.batches = []
        self.lock = threading.Lock()

    def __call__(self, batch):
        with self.lock:
            self.batches.append(list(batch))

    def events(self):
        with self.lock:
            return [e for b in self.batches for e in b]

    def wait_for(self, predicate, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.events()):
                return True
            time.sleep(0.05)
        return False


def attrs(n, backend=""):
    return LeaseAttrs(IPv4Address(f"192.168.77.{n}"), backend)


@pytest.fixture
def setup(etcd, prefix):
    etcd.client().write(prefix + "/config", json.dumps({"Network": "10.10.0.0/16"}))
    managers = []

    def make():
        mgr = LocalManager(EtcdRegistry([etcd.endpoint], prefix))
        managers.append(mgr)
        return mgr

    yield make


@pytest.fixture
def watcher_thread():
    started = []

    def start(watcher):
        thread = threading.Thread(target=watcher.run, name="test-lease-watcher", daemon=True)
        thread.start()
        started.append((watcher, thread))
        return thread

    yield start
    for watcher, thread in started:
        watcher.stop.set()
        thread.join(15)


def test_index_cleared_converges_with_only_the_difference(etcd, prefix, setup, watcher_thread):
    mgr = setup()
    own = mgr.acquire_lease("", attrs(1))
    a, b, c = (setup().acquire_lease("", attrs(n)) for n in (2, 3, 4))
    gated, recorder, stop = GatedManager(mgr), Recorder(), threading.Event()
    watcher = LeaseWatcher(gated, "", own.subnet, recorder, stop, timeout=2.0, max_backoff=0.5)
    watcher_thread(watcher)
    assert recorder.wait_for(lambda ev: len(ev) == 3)
    assert {e.lease.subnet for e in recorder.events()} == {a.subnet, b.subnet, c.subnet}

    # while the watcher is parked: remove a, change b's attributes, add d, and push etcd's
    # history (1000 events) far past the watcher's cursor
    other = setup()
    other.revoke_lease("", a.subnet)
    b2 = other.acquire_lease("", attrs(3, "host-gw"))
    d = other.acquire_lease("", attrs(5))
    client = etcd.client()
    for i in range(1100):
        client.write(prefix + "/noise", str(i))
    with pytest.raises(etcd_lib.EtcdEventIndexCleared):  # really behind etcd's history now
        client.read(prefix + "/subnets", wait=True, waitIndex=int(watcher.cursor) + 1, recursive=True, timeout=5)

    before = len(recorder.batches)
    gated.gate.set()
    assert recorder.wait_for(lambda ev: len(ev) >= 6)
    time.sleep(0.5)
    catch_up = [e for batch in recorder.batches[before:] for e in batch]
    key = lambda e: (e.type, str(e.lease.subnet))
    assert sorted(catch_up, key=key) == sorted(
        [Event.removed(a.subnet), Event(ADDED, b2), Event(ADDED, d)], key=key
    )
    assert any(r.snapshot is not None for r in gated.results[1:])  # it did take a snapshot
    assert set(watcher.known) == {b.subnet, c.subnet, d.subnet}
    assert watcher.known[b.subnet].attrs.backend_type == "host-gw"

    # and it carries on with incremental events afterwards
    e = other.acquire_lease("", attrs(6))
    assert recorder.wait_for(lambda ev: Event(ADDED, e) in ev)


def test_etcd_restart_loses_no_event(etcd, prefix, setup, watcher_thread):
    mgr = setup()
    own = mgr.acquire_lease("", attrs(1))
    peer = setup().acquire_lease("", attrs(2))
    gated, recorder, stop = GatedManager(mgr), Recorder(), threading.Event()
    watcher = LeaseWatcher(gated, "", own.subnet, recorder, stop, timeout=1.0, max_backoff=0.5)
    watcher_thread(watcher)
    assert recorder.wait_for(lambda ev: ev == [Event(ADDED, peer)])

    # a change the parked watcher has not seen yet, then etcd goes away
    later = setup().acquire_lease("", attrs(3))
    etcd.stop()
    try:
        gated.gate.set()
        with pytest.raises(RegistryError, match="cannot reach etcd"):
            mgr.acquire_lease("", attrs(1))
        with pytest.raises(RegistryError, match="failed to"):
            mgr.renew_lease("", own)
        time.sleep(1.5)  # the watcher fails and backs off meanwhile
        assert Event(ADDED, later) not in recorder.events()
    finally:
        etcd.start()

    assert recorder.wait_for(lambda ev: Event(ADDED, later) in ev)
    # everything works again, the renewal included
    renewed = mgr.renew_lease("", own)
    assert renewed.expiration >= own.expiration
    setup().revoke_lease("", peer.subnet)
    assert recorder.wait_for(lambda ev: Event.removed(peer.subnet) in ev)
    assert [e for e in recorder.events() if e.type == REMOVED] == [Event.removed(peer.subnet)]
    assert set(watcher.known) == {later.subnet}
    assert all(e.lease.subnet != own.subnet for e in recorder.events())


def test_an_etcd_index_gone_back_gives_a_snapshot(tmp_path):
    """etcd wiped (or restored from an older backup) under a running watch: the watch's
    cursor is far ahead of etcd's new index, so it would wait for days; the registry notices
    on a time-out and the watch starts over from a snapshot, where our lease is missing."""
    prefix = "/wiped/network"
    with EtcdServer(tmp_path / "etcd") as server:
        client = server.client()
        client.write(prefix + "/config", '{"Network": "10.10.0.0/16"}')
        for i in range(30):  # move the index well ahead
            client.write(f"{prefix}/filler", str(i))
        mgr = LocalManager(EtcdRegistry(server.endpoint, prefix))
        mgr.registry.index_check = 0.0  # look at every time-out
        lease = mgr.acquire_lease("", LeaseAttrs(IPv4Address("192.168.77.1")))
        cursor = mgr.watch_lease("", lease.subnet, None, 1.0).cursor
        server.stop()
        shutil.rmtree(server.data_dir)
        server.start()
        server.client().write(prefix + "/config", '{"Network": "10.10.0.0/16"}')
        result = None
        for _ in range(5):  # the first calls may still meet etcd coming up
            try:
                result = mgr.watch_lease("", lease.subnet, cursor, 1.0)
            except RegistryError:
                time.sleep(1)
                continue
            if result.snapshot is not None:
                break
        assert result is not None and result.snapshot == ()
        assert int(result.cursor) < int(cursor)
        mgr.close()
