"""The network loop and the supervisor against a fake SubnetManager and a fake backend:
renew timing (injectable clock), failed renewals, lease loss (reclaimed or taken), invalid
config then fixed, the preferred subnet, ip-masq, peers, multi-network mode. The same code
runs against a real etcd in tests/e2e/test_daemon_etcd.py."""

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address, IPv4Network
from types import SimpleNamespace

import pytest

import flannel.backend
from flannel.backend.alloc import AllocBackend
from flannel.backend.base import ExternalInterface
from flannel.errors import (
    BackendError, ConfigError, LeaseError, LeaseTakenError, NotFoundError, PermissionDenied, RegistryError,
    RemoteError,
)
from flannel.network.loop import LoopSettings, NetworkLoop
from flannel.network.multi import Supervisor
from flannel.network.subnet_env import SubnetEnv, parse_subnet_env, write_subnet_env
from flannel.subnet.config import BACKEND_TYPES, NetworkConfig
from flannel.subnet.manager import SubnetManager
from flannel.subnet.models import ADDED, REMOVED, Event, Lease, LeaseAttrs, WatchResult

EXT = ExternalInterface("eth0", 2, IPv4Address("192.168.77.1"), IPv4Address("192.168.77.1"), 1500)
CONFIG = '{"Network": "10.10.0.0/16", "Backend": {"Type": "alloc"}}'
OTHER = IPv4Address("192.168.77.2")
DAY = 24 * 3600.0


class FakeClock:
    """Time that only moves when the loop sleeps; sleeping returns True once stopped."""

    def __init__(self, stop):
        self.now = 1_000_000.0
        self.stop = stop
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds
        return self.stop.is_set()


class FakeManager(SubnetManager):
    """In-memory leases of several networks; scripted failures per call."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self.configs = {}
        self.leases = {}  # (network, subnet) -> Lease
        self.fail = {"config": [], "acquire": [], "renew": [], "watch": []}  # queued exceptions
        self.calls = []
        self.lease_events = []  # events for watch_lease with a cursor
        self.networks_results = []
        self.on_renew = None

    def _maybe_fail(self, what):
        if self.fail[what]:
            raise self.fail[what].pop(0)

    def _expiry(self):
        return datetime.fromtimestamp(self.clock() + DAY, timezone.utc)

    def get_network_config(self, network):
        self.calls.append(("config", network))
        self._maybe_fail("config")
        if network not in self.configs:
            raise NotFoundError(f"no config for network {network!r}")
        return NetworkConfig.parse(self.configs[network])

    def acquire_lease(self, network, attrs, prefer=None):
        self.calls.append(("acquire", network, prefer))
        self._maybe_fail("acquire")
        config = self.get_network_config(network)
        for (net, subnet), lease in self.leases.items():
            if net == network and lease.attrs.public_ip == attrs.public_ip:
                return lease
        taken = {s for (n, s) in self.leases if n == network}
        choices = [prefer] if prefer is not None and prefer not in taken else []
        choices += [s for s in config.subnets() if s not in taken]
        lease = Lease(choices[0], attrs, self._expiry())
        self.leases[(network, lease.subnet)] = lease
        return lease

    def renew_lease(self, network, lease):
        self.calls.append(("renew", network, self.clock()))
        if self.on_renew:
            self.on_renew()
        self._maybe_fail("renew")
        current = self.leases.get((network, lease.subnet))
        if current is None:
            raise NotFoundError(f"lease {lease.subnet} does not exist")
        if current.attrs.public_ip != lease.attrs.public_ip:
            raise LeaseTakenError(f"lease {lease.subnet} is held by {current.attrs.public_ip}")
        renewed = Lease(lease.subnet, lease.attrs, self._expiry())
        self.leases[(network, lease.subnet)] = renewed
        return renewed

    def revoke_lease(self, network, subnet, holder=None):
        self.leases.pop((network, subnet), None)

    def watch_lease(self, network, subnet, cursor, timeout):
        if cursor is None:
            lease = self.leases.get((network, subnet))
            return WatchResult(snapshot=(lease,) if lease else (), cursor="1")
        self._maybe_fail("watch")
        if self.lease_events:
            return WatchResult(events=(self.lease_events.pop(0),), cursor=str(int(cursor) + 1))
        time.sleep(0.01)
        return WatchResult(cursor=cursor)

    def watch_leases(self, network, cursor, timeout):
        if cursor is None:
            snap = tuple(le for (n, _), le in self.leases.items() if n == network)
            return WatchResult(snapshot=snap, cursor="1")
        time.sleep(0.01)
        return WatchResult(cursor=cursor)

    def watch_networks(self, cursor, timeout):
        if self.networks_results:
            return self.networks_results.pop(0)
        time.sleep(0.01)
        return WatchResult(cursor=cursor or "1")

    def add_reservation(self, network, reservation):
        raise NotImplementedError

    def remove_reservation(self, network, subnet, holder=None):
        raise NotImplementedError

    def list_reservations(self, network):
        return []


class FakeBackend(AllocBackend):
    instances = []

    def __init__(self, ext_iface, config):
        super().__init__(ext_iface, config)
        self.applied, self.started, self.stopped = [], [], 0
        self.calls = []  # ("sync", subnets) and ("apply", count), in order
        FakeBackend.instances.append(self)

    def start(self, lease, stop):
        self.started.append(lease)

    def apply(self, events):
        self.applied.extend(events)
        self.calls.append(("apply", len(events)))

    def sync(self, leases):
        self.calls.append(("sync", sorted(str(lease.subnet) for lease in leases)))

    def stop(self):
        self.stopped += 1


class FakeMasq:
    def __init__(self):
        self.calls = []

    def setup(self, network, subnet):
        self.calls.append(("setup", network, subnet))

    def teardown(self, network, subnet):
        self.calls.append(("teardown", network, subnet))


def make_loop(tmp_path, manager, stop, *, clock=None, ip_masq=False, network="", **kw):
    settings = LoopSettings(network=network, subnet_file=tmp_path / "subnet.env", ip_masq=ip_masq,
                            renew_margin=3600.0, watch_timeout=0.05, config_retry=0.01)
    events = SimpleNamespace(ready=[], fatal=[])
    loop = NetworkLoop(
        manager, EXT, settings, stop,
        on_ready=lambda net, lease: events.ready.append(lease),
        on_fatal=lambda msg: (events.fatal.append(msg), stop.set()),
        backend_factory=lambda type_name, ext, config: FakeBackend(ext, config),
        clock=clock or time.time, sleep=clock.sleep if clock else None, **kw,
    )
    return loop, events


def run_thread(loop):
    thread = threading.Thread(target=loop.run, name="test-loop", daemon=True)
    thread.start()
    return thread


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def stop():
    event = threading.Event()
    yield event
    event.set()


# -- renewal ---------------------------------------------------------------------


def test_publishes_then_renews_at_expiration_minus_margin(tmp_path, stop):
    clock = FakeClock(stop)
    manager = FakeManager(clock)
    manager.configs[""] = CONFIG
    renewals = []
    manager.on_renew = lambda: renewals.append(clock.now) or (len(renewals) == 3 and stop.set())
    loop, events = make_loop(tmp_path, manager, stop, clock=clock)
    start = clock.now
    loop.run()
    assert [r - start for r in renewals] == [DAY - 3600, 2 * (DAY - 3600), 3 * (DAY - 3600)]
    lease = events.ready[0]
    assert len(events.ready) == 1 and not events.fatal
    assert parse_subnet_env((tmp_path / "subnet.env").read_text()) == {
        "FLANNEL_NETWORK": "10.10.0.0/16", "FLANNEL_SUBNET": f"{lease.subnet.network_address + 1}/24",
        "FLANNEL_MTU": "1500", "FLANNEL_IPMASQ": "false",
    }
    backend = FakeBackend.instances[-1]
    assert backend.started == [lease] and backend.stopped == 1
    assert (("", lease.subnet) in manager.leases), "the lease is kept on stop"


def test_failed_renewal_is_retried_every_few_seconds(tmp_path, stop, caplog):
    clock = FakeClock(stop)
    manager = FakeManager(clock)
    manager.configs[""] = CONFIG
    manager.fail["renew"] = [RegistryError("etcd down")] * 6
    renewed = []
    manager.on_renew = lambda: renewed.append(clock.now) or (len(renewed) == 7 and stop.set())
    loop, _ = make_loop(tmp_path, manager, stop, clock=clock)
    with caplog.at_level(logging.INFO, logger="flannel.network.loop"):
        loop.run()
    gaps = [b - a for a, b in zip(renewed, renewed[1:])]
    assert len(gaps) == 6 and all(0 < gap <= 5.0 for gap in gaps), gaps
    assert loop.lease.expiration.timestamp() == pytest.approx(renewed[-1] + DAY)
    failures = [r for r in caplog.records if "renewing lease" in r.getMessage() and "failed" in r.getMessage()]
    assert len(failures) == 1, "an outage is logged once"
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_reservation_is_not_renewed_in_a_tight_loop(tmp_path, stop):
    clock = FakeClock(stop)
    manager = FakeManager(clock)
    manager.configs[""] = CONFIG
    manager.leases[("", IPv4Network("10.10.9.0/24"))] = Lease(IPv4Network("10.10.9.0/24"), LeaseAttrs(EXT.ext_addr))
    manager.on_renew = lambda: stop.set()
    loop, events = make_loop(tmp_path, manager, stop, clock=clock)
    loop.run()
    assert events.ready[0].subnet == IPv4Network("10.10.9.0/24")
    assert min(clock.sleeps) >= 3600


# -- lease lost ----------------------------------------------------------------------


def test_lost_lease_that_is_still_free_is_reclaimed(tmp_path, stop):
    clock = FakeClock(stop)
    manager = FakeManager(clock)
    manager.configs[""] = CONFIG
    loop, events = make_loop(tmp_path, manager, stop, clock=clock)

    renewals = []

    def delete_first_time():
        renewals.append(clock.now)
        if len(renewals) == 1:
            manager.leases.clear()  # expired during an outage
        else:
            stop.set()

    manager.on_renew = delete_first_time
    loop.run()
    subnet = events.ready[0].subnet
    assert not events.fatal
    assert ("acquire", "", subnet) in manager.calls, "re-acquired with the lost subnet preferred"
    assert ("", subnet) in manager.leases


def test_lost_lease_while_the_config_is_gone_waits_for_the_config(tmp_path, stop):
    """etcdctl rm -r <prefix>, then the config written again: the lease and the config
    vanish together; we wait for the config instead of exiting, and get our subnet back."""
    clock = FakeClock(stop)
    manager = FakeManager(clock)
    manager.configs[""] = CONFIG
    loop, events = make_loop(tmp_path, manager, stop, clock=clock)
    state = {"renewals": 0, "config_reads": 0}

    def wipe_prefix():
        state["renewals"] += 1
        if state["renewals"] == 1:
            manager.leases.clear()
            del manager.configs[""]
        else:
            stop.set()

    def config_back_later(original=manager.get_network_config):
        def get(network):
            state["config_reads"] += 1
            if state["config_reads"] == 4:  # a few failed reads, then the admin is done
                manager.configs[""] = '{"Network": "10.10.0.0/16", "Backend": '
            if state["config_reads"] == 6:
                manager.configs[""] = CONFIG
            return original(network)
        return get

    manager.on_renew = wipe_prefix
    manager.get_network_config = config_back_later()
    loop.run()
    subnet = events.ready[0].subnet
    assert not events.fatal, events.fatal
    assert ("", subnet) in manager.leases and state["renewals"] == 2
    assert state["config_reads"] >= 6  # missing, then invalid, then good


def test_renewal_that_keeps_losing_races_is_retried(tmp_path, stop):
    clock = FakeClock(stop)
    manager = FakeManager(clock)
    manager.configs[""] = CONFIG
    manager.fail["renew"] = [LeaseError("failed to renew lease: the key kept changing under us")]
    renewed = []
    manager.on_renew = lambda: renewed.append(clock.now) or (len(renewed) == 2 and stop.set())
    loop, events = make_loop(tmp_path, manager, stop, clock=clock)
    loop.run()
    assert not events.fatal and len(renewed) == 2
    assert loop.lease.expiration.timestamp() == pytest.approx(renewed[-1] + DAY)


def test_lost_lease_held_by_another_host_is_fatal(tmp_path, stop):
    clock = FakeClock(stop)
    manager = FakeManager(clock)
    manager.configs[""] = CONFIG
    loop, events = make_loop(tmp_path, manager, stop, clock=clock)

    def steal():
        for key, lease in list(manager.leases.items()):
            manager.leases.pop(key)
            manager.fail["renew"].append(NotFoundError("gone"))
            manager.leases[key] = Lease(lease.subnet, LeaseAttrs(OTHER), lease.expiration)

    manager.on_renew = steal
    loop.run()
    assert len(events.fatal) == 1
    assert "192.168.77.2" in events.fatal[0] and "now holds" in events.fatal[0]
    assert "subnet.env" in events.fatal[0]


def test_renew_that_finds_another_host_is_fatal(tmp_path, stop):
    clock = FakeClock(stop)
    manager = FakeManager(clock)
    manager.configs[""] = CONFIG
    manager.fail["renew"] = [LeaseTakenError("lease 10.10.1.0/24 is held by 192.168.77.2")]
    loop, events = make_loop(tmp_path, manager, stop, clock=clock)
    loop.run()
    assert events.fatal and "192.168.77.2" in events.fatal[0]
    assert "exiting so that the service manager restarts" in events.fatal[0]


def test_lease_deleted_behind_our_back_is_reclaimed_at_once(tmp_path, stop):
    """The own-lease watch wakes the renew loop: no waiting for the next renewal (23 h)."""
    manager = FakeManager()
    manager.configs[""] = CONFIG
    loop, events = make_loop(tmp_path, manager, stop)
    thread = run_thread(loop)
    assert wait_for(lambda: events.ready)
    subnet = events.ready[0].subnet
    manager.leases.clear()
    manager.lease_events.append(Event.removed(subnet))
    assert wait_for(lambda: ("", subnet) in manager.leases)
    assert ("acquire", "", subnet) in manager.calls
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and not events.fatal


@pytest.mark.parametrize("refusal", [
    NotFoundError("no config for network '' (404)"),  # a server that lost the config meanwhile
    ConfigError("Network is missing"),                 # a server whose config is being rewritten
    RemoteError("the server answered 400"),
    RegistryError("server unreachable"),
])
def test_own_lease_watch_rides_out_any_refusal(tmp_path, stop, refusal):
    """A refused own-lease watch is retried, never fatal; it still wakes the renew loop after."""
    manager = FakeManager()
    manager.configs[""] = CONFIG
    manager.fail["watch"] = [refusal]
    loop, events = make_loop(tmp_path, manager, stop)
    thread = run_thread(loop)
    assert wait_for(lambda: events.ready)
    assert wait_for(lambda: not manager.fail["watch"])
    subnet = events.ready[0].subnet
    manager.leases.clear()
    manager.lease_events.append(Event.removed(subnet))
    assert wait_for(lambda: ("", subnet) in manager.leases)
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and not events.fatal


def test_a_refusal_for_good_is_fatal_with_its_message_and_no_traceback(tmp_path, stop, caplog):
    """A server that answers 403 (a client certificate for another host) ends the daemon with
    the server's words, not with a traceback as a bug would."""
    manager = FakeManager()
    manager.configs[""] = CONFIG
    manager.fail["acquire"] = [PermissionDenied("server answered 403: not allowed to acquire a lease")]
    loop, events = make_loop(tmp_path, manager, stop)
    with caplog.at_level(logging.ERROR):
        thread = run_thread(loop)
        thread.join(5)
    assert not thread.is_alive()
    assert events.fatal == ["server answered 403: not allowed to acquire a lease"]
    assert "403" in caplog.text and not any(r.exc_info for r in caplog.records)


def test_a_stop_during_a_slow_acquire_publishes_nothing(tmp_path, stop):
    """A network retired (or the daemon stopped) while etcd is slow to grant the lease: the
    lease that arrives afterwards starts no backend, adds no rules and writes no file."""
    manager = FakeManager()
    manager.configs[""] = CONFIG
    entered, release = threading.Event(), threading.Event()
    acquire = manager.acquire_lease

    def slow_acquire(*args, **kwargs):
        entered.set()
        release.wait(10)
        return acquire(*args, **kwargs)

    manager.acquire_lease = slow_acquire
    masq = FakeMasq()
    loop, events = make_loop(tmp_path, manager, stop, ip_masq=True, masquerade=masq)
    thread = run_thread(loop)
    assert entered.wait(10)
    stop.set()
    loop.shutdown()  # as the supervisor's retire does after its join times out
    release.set()
    thread.join(5)
    assert not thread.is_alive()
    assert masq.calls == [] and not events.ready and not (tmp_path / "subnet.env").exists()
    assert FakeBackend.instances[-1].started == []


def test_a_stop_while_the_data_path_starts_writes_no_subnet_file(tmp_path, stop):
    """The supervisor retires a network while its backend is starting (shutdown() then gives
    up on the lock the publishing thread holds, and the file is removed): the file does not
    come back, and the thread's own shutdown removes the rules and stops the backend."""
    manager = FakeManager()
    manager.configs[""] = CONFIG

    class SlowStart(FakeBackend):
        def start(self, lease, stop_event):
            super().start(lease, stop_event)
            stop.set()  # the stop arrives while the data path is being set up

    masq = FakeMasq()
    loop, events = make_loop(tmp_path, manager, stop, ip_masq=True, masquerade=masq)
    loop.backend_factory = lambda type_name, ext, config: SlowStart(ext, config)
    thread = run_thread(loop)
    thread.join(5)
    assert not thread.is_alive()
    assert not (tmp_path / "subnet.env").exists() and not events.ready
    backend = FakeBackend.instances[-1]
    assert backend.started and backend.stopped == 1
    assert [c[0] for c in masq.calls] == ["setup", "teardown"]


# -- config, acquire, publish ------------------------------------------------------------


def test_invalid_config_is_logged_once_per_change_and_never_used(tmp_path, stop, caplog):
    clock = FakeClock(stop)
    manager = FakeManager(clock)
    manager.fail["config"] = [ConfigError("Network is missing")] * 5 + [ConfigError("SubnetLen 31 is too long")] * 5
    manager.configs[""] = CONFIG
    manager.on_renew = lambda: stop.set()
    loop, events = make_loop(tmp_path, manager, stop, clock=clock)
    seen_file_while_bad = []
    original = manager.get_network_config

    def watched(network):
        seen_file_while_bad.append((tmp_path / "subnet.env").exists())
        return original(network)

    manager.get_network_config = watched
    with caplog.at_level(logging.ERROR, logger="flannel.network.loop"):
        loop.run()
    messages = [r.getMessage() for r in caplog.records if "not usable" in r.getMessage()]
    assert len(messages) == 2 and "Network is missing" in messages[0] and "SubnetLen 31" in messages[1]
    assert not any(seen_file_while_bad[:10])
    first_acquire = next(i for i, c in enumerate(manager.calls) if c[0] == "acquire")
    assert all(c[0] == "config" for c in manager.calls[:first_acquire]) and first_acquire >= 10
    assert events.ready and (tmp_path / "subnet.env").exists()


def test_existing_subnet_file_is_preferred(tmp_path, stop):
    clock = FakeClock(stop)
    manager = FakeManager(clock)
    manager.configs[""] = CONFIG
    manager.on_renew = lambda: stop.set()
    write_subnet_env(tmp_path / "subnet.env", SubnetEnv(IPv4Network("10.10.0.0/16"),
                                                        IPv4Network("10.10.77.0/24"), 1500, False))
    loop, events = make_loop(tmp_path, manager, stop, clock=clock)
    loop.run()
    assert ("acquire", "", IPv4Network("10.10.77.0/24")) in manager.calls
    assert events.ready[0].subnet == IPv4Network("10.10.77.0/24")


def test_store_outage_during_acquire_is_retried_with_backoff(tmp_path, stop, caplog):
    clock = FakeClock(stop)
    manager = FakeManager(clock)
    manager.configs[""] = CONFIG
    manager.fail["acquire"] = [RegistryError("connection refused")] * 8
    manager.on_renew = lambda: stop.set()
    loop, events = make_loop(tmp_path, manager, stop, clock=clock)
    with caplog.at_level(logging.WARNING, logger="flannel.network.loop"):
        loop.run()
    assert events.ready
    waits = clock.sleeps[:8]
    assert waits == sorted(waits) and max(waits) <= 30 and waits[0] < waits[-1]
    assert sum("acquiring" in r.getMessage() for r in caplog.records) == 1


def test_ip_masq_set_up_and_removed_and_written(tmp_path, stop):
    clock = FakeClock(stop)
    manager = FakeManager(clock)
    manager.configs[""] = CONFIG
    manager.on_renew = lambda: stop.set()
    masq = FakeMasq()
    loop, events = make_loop(tmp_path, manager, stop, clock=clock, ip_masq=True, masquerade=masq)
    stopped_at_teardown = []
    teardown = masq.teardown
    masq.teardown = lambda *a: (stopped_at_teardown.append(loop.backend.stopped), teardown(*a))
    loop.run()
    subnet = events.ready[0].subnet
    net = IPv4Network("10.10.0.0/16")
    assert masq.calls == [("setup", net, subnet), ("teardown", net, subnet)]
    # the rules go before the backend stops (which may take seconds the watchdog counts)
    assert stopped_at_teardown == [0] and loop.backend.stopped == 1
    assert "FLANNEL_IPMASQ=true\n" in (tmp_path / "subnet.env").read_text()


def manager_with_a_peer():
    manager = FakeManager()
    manager.configs[""] = CONFIG
    peer = Lease(IPv4Network("10.10.200.0/24"), LeaseAttrs(OTHER), None)
    manager.leases[("", peer.subnet)] = peer
    return manager, peer


def test_peers_reach_the_backend_but_never_our_own_lease(tmp_path, stop):
    manager, peer = manager_with_a_peer()
    loop, events = make_loop(tmp_path, manager, stop)
    thread = run_thread(loop)
    assert wait_for(lambda: FakeBackend.instances and FakeBackend.instances[-1].applied)
    stop.set()
    thread.join(5)
    applied = FakeBackend.instances[-1].applied
    assert [(e.type, e.lease.subnet) for e in applied] == [(ADDED, peer.subnet)]
    # the first snapshot, our own lease left out, lets the backend sweep before it adds
    assert FakeBackend.instances[-1].calls == [("sync", [str(peer.subnet)]), ("apply", 1)]


class SweepFails(FakeBackend):
    def sync(self, leases):
        raise BackendError("failed to remove route 10.10.9.0/24: Operation not permitted")


def test_a_failing_sync_is_logged_and_the_peers_still_applied(tmp_path, stop, caplog):
    loop, events = make_loop(tmp_path, manager_with_a_peer()[0], stop)
    loop.backend_factory = lambda type_name, ext, config: SweepFails(ext, config)
    thread = run_thread(loop)
    assert wait_for(lambda: FakeBackend.instances and FakeBackend.instances[-1].applied)
    stop.set()
    thread.join(5)
    assert not events.fatal
    assert any("departed peers" in r.getMessage() and "10.10.9.0/24" in r.getMessage()
               for r in caplog.records if r.levelno == logging.ERROR)


class ApplyFailsOnce(FakeBackend):
    def apply(self, events):
        super().apply(events)
        if sum(c[0] == "apply" for c in self.calls) == 1:  # the first batch only
            raise BackendError("failed to read kernel state over netlink: No buffer space available")


def test_a_failed_apply_is_made_good_from_a_fresh_snapshot(tmp_path, stop, caplog):
    """The kernel refused a batch for a moment: the peers are applied again (with a sync)
    from a new snapshot instead of staying unprogrammed."""
    manager, peer = manager_with_a_peer()
    loop, events = make_loop(tmp_path, manager, stop)
    loop.backend_factory = lambda type_name, ext, config: ApplyFailsOnce(ext, config)
    thread = run_thread(loop)
    assert wait_for(lambda: FakeBackend.instances and
                    sum(c[0] == "apply" for c in FakeBackend.instances[-1].calls) >= 2)
    backend = FakeBackend.instances[-1]
    stop.set()
    thread.join(5)
    assert [c[0] for c in backend.calls[:4]] == ["sync", "apply", "sync", "apply"]
    assert [e.lease.subnet for e in backend.applied] == [peer.subnet, peer.subnet]
    assert not events.fatal
    assert any("applying all peers again" in r.getMessage() for r in caplog.records)


def test_stop_while_waiting_for_config_is_prompt(tmp_path, stop):
    manager = FakeManager()  # no config at all
    loop, events = make_loop(tmp_path, manager, stop)
    thread = run_thread(loop)
    assert wait_for(lambda: len(manager.calls) >= 2)
    began = time.monotonic()
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - began < 2
    assert not events.ready and not (tmp_path / "subnet.env").exists()


# -- supervisor, registry ----------------------------------------------------------------


def test_supervisor_multi_network_watch(tmp_path, stop):
    manager = FakeManager()
    manager.configs.update(blue=CONFIG, red=CONFIG.replace("10.10.", "10.20."), green=CONFIG)
    manager.networks_results = [WatchResult(snapshot=("blue", "red", "green"), cursor="5")]
    opts = SimpleNamespace(networks=["blue", "red"], watch_networks=True, subnet_dir=str(tmp_path),
                           subnet_file=str(tmp_path / "single.env"), ip_masq=False,
                           subnet_lease_renew_margin=60)
    notified = []
    sup = Supervisor(manager, EXT, opts, stop, notify=notified.append, watch_timeout=0.05,
                     loop_factory=lambda *a, **kw: NetworkLoop(
                         *a, backend_factory=lambda t, e, c: FakeBackend(e, c), **kw))
    thread = threading.Thread(target=sup.run, daemon=True)
    thread.start()
    blue, red = tmp_path / "blue.env", tmp_path / "red.env"
    assert wait_for(lambda: blue.exists() and red.exists())
    assert "FLANNEL_NETWORK=10.20.0.0/16" in red.read_text()
    assert not (tmp_path / "green.env").exists(), "not in --networks"
    assert notified == ["READY=1"]
    manager.networks_results.append(WatchResult(events=(Event(REMOVED, network="red"),), cursor="6"))
    assert wait_for(lambda: not red.exists())
    assert sup.loop("red") is None and sup.loop("blue") is not None
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and sup.status == 0


def test_supervisor_network_watch_that_dies_exits_1(tmp_path, stop):
    """A dying --watch-networks watcher ends the daemon with status 1, so that systemd's
    Restart=on-failure brings it back (it used to end with 0 and stay down)."""
    manager = FakeManager()
    manager.networks_results = [WatchResult(snapshot=("blue",), cursor="5")]
    opts = SimpleNamespace(networks=[], watch_networks=True, subnet_dir=str(tmp_path),
                           subnet_file=str(tmp_path / "single.env"), ip_masq=False,
                           subnet_lease_renew_margin=60)

    def buggy_factory(*args, **kwargs):
        raise KeyError("a bug in starting a network")

    sup = Supervisor(manager, EXT, opts, stop, notify=lambda s: None, watch_timeout=0.05,
                     loop_factory=buggy_factory)
    thread = threading.Thread(target=lambda: setattr(sup, "result", sup.run()), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and sup.result == 1


def test_supervisor_fatal_loop_sets_status_1(tmp_path, stop):
    manager = FakeManager()
    manager.configs[""] = CONFIG
    opts = SimpleNamespace(networks=[], watch_networks=False, subnet_dir=str(tmp_path),
                           subnet_file=str(tmp_path / "subnet.env"), ip_masq=False,
                           subnet_lease_renew_margin=60)

    def broken_backend(type_name, ext, config):
        from flannel.errors import BackendError
        raise BackendError("host-gw refuses --public-ip that differs from the interface address")

    sup = Supervisor(manager, EXT, opts, stop, notify=lambda s: None,
                     loop_factory=lambda *a, **kw: NetworkLoop(*a, backend_factory=broken_backend, **kw))
    assert sup.run() == 1
    assert not (tmp_path / "subnet.env").exists()


def test_backend_registry_matches_config_types():
    assert set(flannel.backend.REGISTRY) == set(BACKEND_TYPES)
    alloc = flannel.backend.create_backend("alloc", EXT, NetworkConfig.parse(CONFIG))
    assert isinstance(alloc, AllocBackend) and alloc.mtu == EXT.mtu
    assert alloc.lease_attrs().to_json() == '{"PublicIP":"192.168.77.1"}'
    with pytest.raises(ConfigError, match="unknown"):
        flannel.backend.create_backend("wireguard", EXT, NetworkConfig.parse(CONFIG))


def test_importing_the_backend_package_is_lazy():
    import subprocess
    import sys
    code = ("import sys, flannel.backend, flannel.network.loop, flannel.network.multi;"
            "bad = [m for m in ('pyroute2', 'cffi', '_cffi_backend', 'flannel._proxy') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_dying_peer_watcher_stops_the_daemon(tmp_path, stop):
    """A bug in the backend's apply must not leave a daemon running without a data path."""
    manager = FakeManager()
    manager.configs[""] = CONFIG
    manager.leases[("", IPv4Network("10.10.200.0/24"))] = Lease(IPv4Network("10.10.200.0/24"), LeaseAttrs(OTHER))

    class Buggy(FakeBackend):
        def apply(self, events):
            raise ZeroDivisionError("bug")

    loop, events = make_loop(tmp_path, manager, stop)
    loop.backend_factory = lambda type_name, ext, config: Buggy(ext, config)
    thread = run_thread(loop)
    assert wait_for(lambda: events.fatal)
    assert "net-default-peers" in events.fatal[0]
    thread.join(5)
    assert not thread.is_alive()


def test_retry_backs_off_to_ten_seconds_and_logs_once(caplog):
    """An outage costs each loop at most one try every 10 s, so a host is back at most
    10 s after etcd (or the server) is; the failure and the recovery are logged once each."""
    from flannel.network.retry import Retry

    retry = Retry("watching our lease", logging.getLogger("test.retry"))
    with caplog.at_level(logging.INFO, logger="test.retry"):
        delays = [retry.failed(RegistryError("etcd down")) for _ in range(7)]
        retry.succeeded()
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert retry.failed(RegistryError("again")) == 1.0
