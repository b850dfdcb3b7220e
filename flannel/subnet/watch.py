"""Watch loops shared by every backend: the peers' leases of one network, and (multi-network
mode) the set of networks.

Each watcher keeps the cursor and the set it knows. A snapshot (the first answer, or the
store's answer when the cursor fell out of its history) is turned into the difference
against what was known, so consumers only ever see changes. Store failures are retried with
capped back-off, logged once when they start and once when they end; the cursor is kept
across them, so no event is lost.
"""

from __future__ import annotations

import logging
import threading
from ipaddress import IPv4Network
from typing import Callable, Dict, List, Optional, Set

from flannel.errors import FlannelError
from flannel.subnet.manager import SubnetManager
from flannel.subnet.models import ADDED, REMOVED, Event, Lease, WatchResult

log = logging.getLogger(__name__)

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 10.0
RESYNC_BACKOFF = 60.0  # a consumer that keeps failing gets everything again at most this often


class _WatchLoop:
    """The retry loop; subclasses say what to poll and how to fold a result in."""

    what = "watch"

    def __init__(self, stop: threading.Event, timeout: float, max_backoff: float):
        self.stop = stop
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.cursor: Optional[str] = None
        self._failing = False
        self._resync = threading.Event()  # set by request_resync(), from a consumer
        self._resync_delay = FIRST_BACKOFF

    def run(self) -> None:
        """Blocking loop until `stop` is set (a thread target). If a consumer callback
        raises, the loop logs why and sets `stop`, so the daemon shuts down."""
        try:
            self._loop()
        except Exception:
            log.exception("%s stopped by an unexpected error", self.what)
            self.stop.set()

    def _loop(self) -> None:
        first = min(FIRST_BACKOFF, self.max_backoff)
        delay = first
        while not self.stop.is_set():
            try:
                result = self._poll()
            except FlannelError as exc:
                if not self._failing:
                    log.warning("%s failed, retrying with back-off: %s", self.what, exc)
                    self._failing = True
                self.stop.wait(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            if self._failing:
                log.info("%s works again", self.what)
                self._failing = False
            delay = first
            self._take(result)
            if result.cursor is not None:
                self.cursor = result.cursor
            if self._resync.is_set():
                self._start_over()

    def request_resync(self) -> None:
        """The consumer could not apply what it was given (e.g. the kernel refused for a
        moment): start over from a fresh snapshot, in which everything counts as new, so
        that nothing stays lost until the next snapshot happens to come. Waits double from
        1 s up to RESYNC_BACKOFF while the consumer keeps failing."""
        self._resync.set()

    def _start_over(self) -> None:
        self._resync.clear()
        self.cursor = None
        self._forget()
        self.stop.wait(self._resync_delay)
        self._resync_delay = min(self._resync_delay * 2, RESYNC_BACKOFF)

    def _forget(self) -> None:
        """Drop what the consumer was told (subclasses)."""

    def _poll(self) -> WatchResult:
        raise NotImplementedError

    def _take(self, result: WatchResult) -> None:
        raise NotImplementedError


class LeaseWatcher(_WatchLoop):
    """Follows every lease of `network` but our own, calling `on_batch(events)` with the
    changes: `added` for a new lease or one whose attributes changed, `removed` (subnet
    only) for one that went away. Renewals that change nothing but the expiration are not
    passed on.

    On every snapshot, `on_snapshot(leases)` (when given) first receives all its leases but
    our own: the whole truth, against which a consumer can drop state that no event will
    ever remove (peers that left while no daemon ran: the first batch only adds)."""

    def __init__(
        self,
        manager: SubnetManager,
        network: str,
        own_subnet: Optional[IPv4Network],
        on_batch: Callable[[List[Event]], None],
        stop: threading.Event,
        timeout: float = 10.0,
        *,
        max_backoff: float = MAX_BACKOFF,
        on_snapshot: Optional[Callable[[List[Lease]], None]] = None,
    ):
        super().__init__(stop, timeout, max_backoff)
        self.manager = manager
        self.network = network
        self.own_subnet = own_subnet
        self.on_batch = on_batch
        self.on_snapshot = on_snapshot
        self.known: Dict[IPv4Network, Lease] = {}
        self.what = f"watch of the leases of network {network or '(default)'}"

    def _poll(self) -> WatchResult:
        return self.manager.watch_leases(self.network, self.cursor, self.timeout)

    def _take(self, result: WatchResult) -> None:
        if result.snapshot is not None:
            now = {lease.subnet: lease for lease in result.snapshot if lease.subnet != self.own_subnet}
            if self.on_snapshot is not None:
                self.on_snapshot(list(now.values()))
            batch = self._diff(now)
        else:
            batch = [e for e in (self._fold(e) for e in result.events) if e is not None]
        if batch:
            self.on_batch(batch)
            if not self._resync.is_set():
                self._resync_delay = FIRST_BACKOFF  # the consumer took it: failures are over

    def _forget(self) -> None:
        self.known = {}

    def _diff(self, now: Dict[IPv4Network, Lease]) -> List[Event]:
        batch = [Event.removed(subnet) for subnet in self.known if subnet not in now]
        for subnet, lease in now.items():
            old = self.known.get(subnet)
            if old is None or old.attrs != lease.attrs or old.attrs.extra != lease.attrs.extra:
                batch.append(Event(ADDED, lease))
        self.known = now
        return batch

    def _fold(self, event: Event) -> Optional[Event]:
        """Apply one event to the known set; the event to pass on, or None."""
        if event.lease is None or event.lease.subnet == self.own_subnet:
            return None
        subnet = event.lease.subnet
        if event.type == REMOVED:
            return event if self.known.pop(subnet, None) is not None else None
        old = self.known.get(subnet)
        self.known[subnet] = event.lease
        if old is not None and old.attrs == event.lease.attrs and old.attrs.extra == event.lease.attrs.extra:
            return None
        return event


class NetworkWatcher(_WatchLoop):
    """Follows the networks under the prefix (multi-network mode), calling
    `on_change(added, removed)` with sets of names whenever the set changes."""

    def __init__(
        self,
        manager: SubnetManager,
        on_change: Callable[[Set[str], Set[str]], None],
        stop: threading.Event,
        timeout: float = 10.0,
        *,
        max_backoff: float = MAX_BACKOFF,
    ):
        super().__init__(stop, timeout, max_backoff)
        self.manager = manager
        self.on_change = on_change
        self.known: Set[str] = set()
        self.what = "watch of the networks"

    def _poll(self) -> WatchResult:
        return self.manager.watch_networks(self.cursor, self.timeout)

    def _take(self, result: WatchResult) -> None:
        if result.snapshot is not None:
            now = {str(name) for name in result.snapshot}
        else:
            now = set(self.known)
            for event in result.events:
                if not event.network:
                    continue
                if event.type == REMOVED:
                    now.discard(event.network)
                else:
                    now.add(event.network)
        added, removed = now - self.known, self.known - now
        self.known = now
        if added or removed:
            self.on_change(added, removed)
