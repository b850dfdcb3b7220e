"""One upstream watch per network, fanned out from memory to every parked long poll.

Go's server opens one etcd watch per client long poll, so N hosts cost etcd 2N watches. Here a
`WatchHub` per network (and one for the network list) runs a single watch loop against the
SubnetManager, keeps the current state (for snapshots) and a bounded window of recent events
keyed by etcd index (for cursors), and wakes every waiting request on each change. A cursor
older than the window gets a snapshot, exactly as when etcd's own history is cleared. When the
upstream watch itself falls behind (etcd answers with a snapshot), the hub turns that snapshot
into the difference against what it knew, so that its clients still see plain events.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Callable, Dict, List, Optional, Tuple

from flannel.errors import FlannelError, RegistryError
from flannel.subnet.manager import SubnetManager
from flannel.subnet.models import ADDED, REMOVED, Event, WatchResult

log = logging.getLogger(__name__)

WINDOW = 1000           # events kept per network, like etcd v2's own history
UPSTREAM_TIMEOUT = 10.0  # one upstream watch call; bounds how long a stopping hub lingers
IDLE_SECONDS = 300.0    # a hub nobody asked for this long stops its watch
MAX_BACKOFF = 10.0


class _LeaseKind:
    """How a lease hub keys its state: by subnet; snapshot items are Leases."""

    @staticmethod
    def key_of_event(event: Event):
        return event.lease.subnet

    @staticmethod
    def key_of_item(item):
        return item.subnet

    @staticmethod
    def item_of_event(event: Event):
        return event.lease

    @staticmethod
    def added(item) -> Event:
        return Event(ADDED, item)

    @staticmethod
    def removed(key) -> Event:
        return Event.removed(key)


class _NetworkKind:
    """A network-list hub keys its state by name; snapshot items are names."""

    @staticmethod
    def key_of_event(event: Event):
        return event.network

    @staticmethod
    def key_of_item(item):
        return item

    @staticmethod
    def item_of_event(event: Event):
        return event.network

    @staticmethod
    def added(item) -> Event:
        return Event(ADDED, network=item)

    @staticmethod
    def removed(key) -> Event:
        return Event(REMOVED, network=key)


@dataclass
class Changes:
    """What a poll found: `events` after the cursor (None: the cursor is older than the window,
    send a snapshot), and the cursor to hand back."""

    events: Optional[List[Event]]
    cursor: int


class WatchHub:
    """The single upstream watch of one network (or of the network list) and its window."""

    def __init__(self, name: str, fetch: Callable, kind, closing: threading.Event,
                 window: int = WINDOW):
        self.name = name
        self._fetch = fetch          # (cursor: str | None, timeout) -> WatchResult
        self._kind = kind
        self._closing = closing      # the FanOut's stop
        self._window = window
        self._cond = threading.Condition()
        self._sync_lock = threading.Lock()
        self._state: Dict = {}
        self._indexes: List[int] = []
        self._events: List[Event] = []
        self._floor = 0              # every change after this index is in the window
        self._index = 0              # the index `_state` is current at
        self._synced = False
        self.closed = False
        self.last_used = time.monotonic()

    # -- upstream side ------------------------------------------------------

    def ensure_synced(self) -> None:
        """Take the first snapshot (in the caller's thread, so errors reach that request)
        and start the watch thread."""
        if self._synced:
            return
        with self._sync_lock:
            if self._synced:
                return
            result = self._fetch(None, 0.0)
            with self._cond:
                self._state = {self._kind.key_of_item(i): i for i in (result.snapshot or ())}
                self._index = self._floor = _index_of(result.cursor)
                self._synced = True
            threading.Thread(target=self._run, name=f"watch-hub-{self.name or '_'}",
                             daemon=True).start()

    def _run(self) -> None:
        failing_since: Optional[float] = None
        backoff = 0.5
        while not self._closing.is_set() and not self.closed:
            try:
                result = self._fetch(str(self._index), UPSTREAM_TIMEOUT)
            except Exception as exc:  # keep serving from memory while the store is away
                if failing_since is None:
                    failing_since = time.monotonic()
                    level = logging.WARNING if isinstance(exc, FlannelError) else logging.ERROR
                    log.log(level, "watch of %s failed, retrying: %s", self.name or "_", exc,
                            exc_info=not isinstance(exc, FlannelError))
                self._closing.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            if failing_since is not None:
                log.info("watch of %s recovered", self.name or "_")
                failing_since, backoff = None, 0.5
            self._apply(result)
        log.debug("watch hub %s stopped", self.name or "_")

    def _apply(self, result: WatchResult) -> None:
        index = _index_of(result.cursor)
        if result.snapshot is None and not result.events:
            # a time-out, or a change that is not ours (e.g. a non-config key under the
            # prefix): move past it, or the next upstream call would return it again
            with self._cond:
                self._index = max(self._index, index)
            return
        with self._cond:
            if result.snapshot is not None:
                events = self._diff(result.snapshot)
            else:
                events = list(result.events)
            for event in events:
                self._record(index, event)
            self._index = max(self._index, index)
            self._trim()
            self._cond.notify_all()

    def _diff(self, snapshot) -> List[Event]:
        """Upstream fell behind and sent the whole state: the events that turn ours into it."""
        new = {self._kind.key_of_item(i): i for i in snapshot}
        events = [self._kind.removed(k) for k in self._state if k not in new]
        events += [self._kind.added(i) for k, i in new.items() if self._state.get(k) != i]
        return events

    def _record(self, index: int, event: Event) -> None:
        key = self._kind.key_of_event(event)
        if event.type == REMOVED:
            self._state.pop(key, None)
        else:
            self._state[key] = self._kind.item_of_event(event)
        self._indexes.append(index)
        self._events.append(event)

    def _trim(self) -> None:
        excess = len(self._indexes) - self._window
        if excess <= 0:
            return
        # cut on an index boundary: a cursor is never in the middle of one change's events
        floor = self._indexes[excess - 1]
        cut = bisect.bisect_right(self._indexes, floor)
        self._floor = max(self._floor, floor)
        del self._indexes[:cut], self._events[:cut]

    # -- request side -------------------------------------------------------

    def snapshot(self, key=None) -> Tuple[tuple, int]:
        """(items, cursor): every item, or only the one under `key`."""
        with self._cond:
            if key is not None:
                item = self._state.get(key)
                return ((item,) if item is not None else ()), self._index
            return tuple(self._state[k] for k in sorted(self._state)), self._index

    def changes(self, cursor: int, wait: float, key=None, limit: int = 500) -> Changes:
        """Events after `cursor` (only those of `key` when given), parking up to `wait`
        seconds until there is one. On time-out or shutdown: no events, cursor unchanged
        (or advanced past changes that did not match `key`)."""
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                if cursor < self._floor:
                    return Changes(None, self._index)
                start = bisect.bisect_right(self._indexes, cursor)
                found = self._select(start, key, limit)
                if found is not None:
                    return found
                if start < len(self._indexes):
                    cursor = self._indexes[-1]  # skip changes of other keys
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed or self._closing.is_set():
                    return Changes([], cursor)
                self._cond.wait(remaining)

    def _select(self, start: int, key, limit: int) -> Optional[Changes]:
        end = len(self._indexes)
        if start >= end:
            return None
        if key is not None:
            # the first event of the key with its own index as the cursor: Go's client reads
            # only Events[0], so each poll delivers one and none is skipped (a "removed"
            # followed by another host's "added" must reach the old holder as "removed")
            for i in range(start, end):
                if self._kind.key_of_event(self._events[i]) == key:
                    return Changes([self._events[i]], self._indexes[i])
            return None
        if end - start > limit:
            end = bisect.bisect_right(self._indexes, self._indexes[start + limit - 1])
        return Changes(self._events[start:end], self._indexes[end - 1])

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


def _index_of(cursor) -> int:
    try:
        return int(cursor)
    except (TypeError, ValueError):
        raise RegistryError(f"the lease store returned cursor {cursor!r}, not an etcd index") from None


class FanOut:
    """The hubs of one server: created on first use, stopped when idle or on close()."""

    def __init__(self, manager: SubnetManager, window: int = WINDOW, idle: float = IDLE_SECONDS):
        self._manager = manager
        self._window = window
        self._idle = idle
        self._lock = threading.Lock()
        self._hubs: Dict[Optional[str], WatchHub] = {}
        self._closing = threading.Event()
        threading.Thread(target=self._reap, name="watch-hub-reaper", daemon=True).start()

    def leases(self, network: str) -> WatchHub:
        """The synced hub of `network` (NotFoundError for a network without a config)."""
        def fetch(cursor, timeout):
            return self._manager.watch_leases(network, cursor, timeout)

        def check():
            self._manager.get_network_config(network)  # refuse unknown networks
        return self._hub(network, fetch, _LeaseKind, check)

    def networks(self) -> WatchHub:
        return self._hub(None, self._manager.watch_networks, _NetworkKind, None)

    def _hub(self, key, fetch, kind, check) -> WatchHub:
        hub = self._existing(key)
        if hub is None:
            if check is not None:
                check()  # outside the lock: a slow store must not hold up other networks
            with self._lock:
                hub = self._hubs.get(key)
                if hub is None or hub.closed:
                    name = key if key is not None else "networks"
                    hub = self._hubs[key] = WatchHub(name, fetch, kind, self._closing, self._window)
                hub.last_used = time.monotonic()
        hub.ensure_synced()
        return hub

    def _existing(self, key) -> Optional[WatchHub]:
        with self._lock:
            if self._closing.is_set():
                raise RegistryError("the server is stopping")
            hub = self._hubs.get(key)
            if hub is None or hub.closed:
                return None
            hub.last_used = time.monotonic()
            return hub

    def _reap(self) -> None:
        """Stop the watch of networks nobody asks about any more (e.g. a deleted network)."""
        while not self._closing.wait(min(self._idle, 60.0)):
            now = time.monotonic()
            with self._lock:
                for key, hub in list(self._hubs.items()):
                    if now - hub.last_used > self._idle:
                        hub.closed = True
                        hub.wake()
                        del self._hubs[key]

    def close(self) -> None:
        """End every parked poll now and let the watch threads stop."""
        self._closing.set()
        with self._lock:
            hubs = list(self._hubs.values())
        for hub in hubs:
            hub.wake()

    def hub_count(self) -> int:
        with self._lock:
            return len(self._hubs)
