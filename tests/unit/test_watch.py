"""LeaseWatcher and NetworkWatcher against a scripted fake manager: diffing of snapshots,
own lease never emitted, cursor kept across failures, back-off, stop."""

import threading
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel.errors import RegistryError
from flannel.subnet.models import ADDED, REMOVED, Event, Lease, LeaseAttrs, WatchResult
from flannel.subnet.watch import LeaseWatcher, NetworkWatcher


def lease(net, ip, backend=""):
    return Lease(IPv4Network(net), LeaseAttrs(IPv4Address(ip), backend))


class ScriptedManager:
    """Answers watch calls from a script; records the cursors it was asked for. When the
    script runs out it sets `stop` so the watcher's loop ends."""

    def __init__(self, script, stop):
        self.script = list(script)
        self.stop = stop
        self.cursors = []

    def _next(self, cursor):
        self.cursors.append(cursor)
        if not self.script:
            self.stop.set()
            return WatchResult(cursor=cursor)
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def watch_leases(self, network, cursor, timeout):
        return self._next(cursor)

    def watch_networks(self, cursor, timeout):
        return self._next(cursor)


OWN = IPv4Network("10.1.1.0/24")
A, B, C = lease("10.1.2.0/24", "192.168.77.2"), lease("10.1.3.0/24", "192.168.77.3"), lease("10.1.4.0/24", "192.168.77.4")


def run_lease_watcher(script):
    stop = threading.Event()
    manager = ScriptedManager(script, stop)
    batches = []
    watcher = LeaseWatcher(manager, "", OWN, batches.append, stop, timeout=0.1, max_backoff=0.01)
    watcher.run()
    return watcher, manager, batches


def test_first_snapshot_is_all_added_but_our_own():
    watcher, _, batches = run_lease_watcher(
        [WatchResult(snapshot=(lease("10.1.1.0/24", "192.168.77.1"), A, B), cursor="10")]
    )
    assert batches == [[Event(ADDED, A), Event(ADDED, B)]]
    assert set(watcher.known) == {A.subnet, B.subnet}


def test_events_update_the_known_set_and_renewals_are_not_repeated():
    renewed_a = Lease(A.subnet, A.attrs, A.expiration, asof=99)
    changed_b = lease("10.1.3.0/24", "192.168.77.3", "vxlan")
    watcher, manager, batches = run_lease_watcher([
        WatchResult(snapshot=(A,), cursor="10"),
        WatchResult(events=(Event(ADDED, B),), cursor="11"),
        WatchResult(events=(Event(ADDED, renewed_a),), cursor="12"),
        WatchResult(events=(Event(ADDED, changed_b),), cursor="13"),
        WatchResult(events=(Event.removed(A.subnet),), cursor="14"),
        WatchResult(events=(Event.removed(A.subnet),), cursor="15"),  # already gone
        WatchResult(events=(Event(ADDED, lease("10.1.1.0/24", "192.168.77.1")),), cursor="16"),  # ours
    ])
    assert batches == [
        [Event(ADDED, A)],
        [Event(ADDED, B)],
        [Event(ADDED, changed_b)],
        [Event.removed(A.subnet)],
    ]
    assert manager.cursors == [None, "10", "11", "12", "13", "14", "15", "16"]
    assert set(watcher.known) == {B.subnet}


def test_snapshot_after_history_loss_emits_only_the_difference():
    changed_b = lease("10.1.3.0/24", "192.168.77.3", "host-gw")
    _, manager, batches = run_lease_watcher([
        WatchResult(snapshot=(A, B), cursor="10"),
        # the cursor fell out of history: the manager answers with a fresh snapshot
        WatchResult(snapshot=(changed_b, C), cursor="2000"),
        WatchResult(snapshot=(changed_b, C), cursor="2001"),  # nothing changed
    ])
    assert batches[0] == [Event(ADDED, A), Event(ADDED, B)]
    assert sorted(batches[1], key=lambda e: (e.type, str(e.lease.subnet))) == [
        Event(ADDED, changed_b), Event(ADDED, C), Event.removed(A.subnet),
    ]
    assert len(batches) == 2
    assert manager.cursors[:3] == [None, "10", "2000"]


def test_every_snapshot_is_offered_whole_before_its_batch():
    """A restarted daemon's first batch only adds: the full snapshot lets the backend drop
    peers that left meanwhile. A snapshot after history loss is offered whole again."""
    stop = threading.Event()
    calls = []
    manager = ScriptedManager([
        WatchResult(snapshot=(lease("10.1.1.0/24", "192.168.77.1"), A, B), cursor="10"),
        WatchResult(events=(Event(ADDED, C),), cursor="11"),
        WatchResult(snapshot=(B,), cursor="2000"),
    ], stop)
    watcher = LeaseWatcher(manager, "", OWN, lambda batch: calls.append(("batch", batch)), stop,
                           timeout=0.1, max_backoff=0.01,
                           on_snapshot=lambda leases: calls.append(("snapshot", leases)))
    watcher.run()
    assert calls == [
        ("snapshot", [A, B]),
        ("batch", [Event(ADDED, A), Event(ADDED, B)]),
        ("batch", [Event(ADDED, C)]),
        ("snapshot", [B]),
        ("batch", [Event.removed(A.subnet), Event.removed(C.subnet)]),
    ]


def test_an_empty_snapshot_is_offered_too():
    stop = threading.Event()
    offered = []
    manager = ScriptedManager([WatchResult(snapshot=(), cursor="3")], stop)
    LeaseWatcher(manager, "", OWN, lambda batch: None, stop, timeout=0.1,
                 on_snapshot=offered.append).run()
    assert offered == [[]]  # no peers at all: everything left over is stale


def test_failures_keep_the_cursor_and_log_once(caplog):
    caplog.set_level("INFO", logger="flannel.subnet.watch")
    _, manager, batches = run_lease_watcher([
        WatchResult(snapshot=(A,), cursor="10"),
        RegistryError("failed to watch: etcd down"),
        RegistryError("failed to watch: etcd down"),
        RegistryError("failed to watch: etcd down"),
        WatchResult(events=(Event(ADDED, B),), cursor="11"),
    ])
    assert manager.cursors == [None, "10", "10", "10", "10", "11"]
    assert batches == [[Event(ADDED, A)], [Event(ADDED, B)]]
    warnings = [r for r in caplog.records if "failed" in r.getMessage()]
    recoveries = [r for r in caplog.records if "works again" in r.getMessage()]
    assert len(warnings) == 1 and len(recoveries) == 1


def test_timeouts_keep_the_cursor():
    _, manager, batches = run_lease_watcher([
        WatchResult(snapshot=(A,), cursor="10"),
        WatchResult(cursor="10"),
        WatchResult(cursor="10"),
    ])
    assert manager.cursors == [None, "10", "10", "10"]
    assert batches == [[Event(ADDED, A)]]


def test_a_failing_consumer_stops_the_daemon():
    stop = threading.Event()
    manager = ScriptedManager([WatchResult(snapshot=(A,), cursor="1")] * 5, stop)

    def explode(batch):
        raise RuntimeError("consumer bug")

    watcher = LeaseWatcher(manager, "", None, explode, stop, timeout=0.1)
    watcher.run()
    assert stop.is_set() and len(manager.cursors) == 1


def test_stop_ends_a_watcher_that_is_backing_off():
    stop = threading.Event()

    class Down:
        def watch_leases(self, network, cursor, timeout):
            raise RegistryError("down")

    watcher = LeaseWatcher(Down(), "", None, lambda b: None, stop, timeout=0.1, max_backoff=30)
    thread = threading.Thread(target=watcher.run, name="test-watch")
    thread.start()
    stop.wait(0.3)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()


@pytest.mark.parametrize("script,expected", [
    (
        [WatchResult(snapshot=("blue", "red"), cursor="5"),
         WatchResult(events=(Event(ADDED, network="green"),), cursor="6"),
         WatchResult(events=(Event(ADDED, network="green"),), cursor="7"),
         WatchResult(events=(Event(REMOVED, network="red"),), cursor="8"),
         WatchResult(snapshot=("blue", "yellow"), cursor="900")],
        [({"blue", "red"}, set()), ({"green"}, set()), (set(), {"red"}), ({"yellow"}, {"green"})],
    ),
])
def test_network_watcher_reports_changes_only(script, expected):
    stop = threading.Event()
    manager = ScriptedManager(script, stop)
    changes = []
    NetworkWatcher(manager, lambda a, r: changes.append((a, r)), stop, timeout=0.1).run()
    assert changes == expected
