"""Helpers the kernel backends share: reading typed Backend options, turning a batch of
lease events into the peers to remove and the peers to add, (for a sync) telling which
peers stay and which routes a departed peer left behind, (at a start) removing the peer
routes another backend of the network left, and the thread that re-checks peer entries
when the kernel reports a change to them.

A batch is coalesced per subnet (the last event wins) and removals are applied before
additions, so that a host that moved to a new subnet keeping its VTEP MAC or public IP
does not lose the new entries to the removal of the old ones.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Callable, Iterable, Iterator, Optional

from flannel.dataplane import netlink
from flannel.dataplane.kstate import KernelState
from flannel.dataplane.nlevents import ChangeMonitor
from flannel.errors import BackendError, ConfigError
from flannel.subnet.config import NetworkConfig
from flannel.subnet.models import ADDED, Event, Lease

log = logging.getLogger(__name__)


def int_option(config: NetworkConfig, name: str, default: int, low: int, high: int) -> int:
    """An integer Backend option in [low, high] (Go's JSON decoder takes whole floats too)."""
    value = config.backend_option(name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"Backend option {name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"Backend option {name} must be between {low} and {high}, got {value}")
    return value


def bool_option(config: NetworkConfig, name: str) -> bool:
    value = config.backend_option(name, False)
    if not isinstance(value, bool):
        raise ConfigError(f"Backend option {name} must be true or false, got {value!r}")
    return value


def split_batch(
    events: Iterable[Event],
    own_subnet: Optional[IPv4Network],
    backend_type: str,
    own_ip: Optional[IPv4Address] = None,
) -> tuple:
    """(subnets to remove, leases to add or update) for one batch. Our own subnet never
    appears. Leases of another backend type are skipped with a warning (they cannot be
    reached through this data path, as Go flanneld also decides), and so are other leases
    with our own public IP (a lease we held before, not yet expired): a route via ourselves
    would loop."""
    last: dict = {}
    for event in events:
        if event.lease is None:
            continue
        last[event.lease.subnet] = event
    removed, added = [], []
    for subnet, event in last.items():
        if subnet == own_subnet:
            continue
        why = None if event.type != ADDED else _unusable(event.lease, backend_type, own_ip)
        if event.type != ADDED:
            removed.append(subnet)
        elif why is not None:
            log.warning("ignoring lease %s of %s: %s", subnet, event.lease.attrs.public_ip, why)
            removed.append(subnet)
        else:
            added.append(event.lease)
    return removed, added


def _unusable(lease: Lease, backend_type: str, own_ip: Optional[IPv4Address]) -> Optional[str]:
    """Why this data path cannot use a peer's lease, or None when it can."""
    if (lease.attrs.backend_type or "udp") != backend_type:  # Go's udp leases carry no BackendType
        return f"its BackendType is {lease.attrs.backend_type!r}, not {backend_type!r}"
    if own_ip is not None and lease.attrs.public_ip == own_ip:
        return f"it has our own public IP {own_ip}"
    return None


def current_peers(leases: Iterable[Lease], own_subnet: Optional[IPv4Network], backend_type: str,
                  own_ip: Optional[IPv4Address] = None) -> dict:
    """{subnet: lease} of the peers a sync keeps: the leases split_batch would add (silently:
    apply logs the skipped ones when the same leases reach it)."""
    return {
        lease.subnet: lease for lease in leases
        if lease.subnet != own_subnet and _unusable(lease, backend_type, own_ip) is None
    }


def peer_subnet_of(config: NetworkConfig, dst: IPv4Network) -> bool:
    """Whether `dst` looks like a lease of this network: inside Network, SubnetLen long."""
    return dst.prefixlen == config.subnet_len and dst.subnet_of(config.network)


def _peer_routes(state: KernelState, config: NetworkConfig, skip: set) -> Iterator:
    """Routes via a gateway to SubnetLen subnets of this network other than `skip`: the
    only routes a backend ever removes (routes outside the overlay, routes without a
    gateway, e.g. udp's overlay route or an address's prefix, are never flannel's peers')."""
    for dst, routes in state.routes.items():
        if dst not in skip and peer_subnet_of(config, dst):
            yield from (route for route in routes if route.gateway is not None)


def stale_routes(state: KernelState, oif: int, config: NetworkConfig, keep: Iterable) -> list:
    """Peer routes (see _peer_routes) on link `oif` to subnets that are not in `keep`: what
    a peer that is gone left behind. Other links are never ours to sweep."""
    return [route for route in _peer_routes(state, config, set(keep)) if route.oif == oif]


def foreign_routes(state: KernelState, config: NetworkConfig, own_subnet: Optional[IPv4Network],
                   own_links: Iterable[int], only_links: Optional[Iterable[int]] = None) -> list:
    """Peer routes (see _peer_routes) of this network on a link not in `own_links` (and,
    when `only_links` is given, on one of those), our own subnet's excepted: what another
    backend of this network left, e.g. vxlan's `via <.0> dev flannel.1 onlink` or host-gw's
    `via <PublicIP> dev eth0` after a switch to udp. Other networks' routes are outside
    this Network and stay."""
    own_links = set(own_links)
    only = None if only_links is None else set(only_links)
    return [
        route for route in _peer_routes(state, config, {own_subnet})
        if route.oif not in own_links and (only is None or route.oif in only)
    ]


def sweep_other_backends(backend: str, config: NetworkConfig, own_subnet: Optional[IPv4Network],
                         own_links: Iterable[int] = (), vxlan_only: bool = False) -> int:
    """Called by every backend's start: remove the routes another backend of this network
    left (foreign_routes; `own_links` carry the starting backend's own), since they are
    more specific than, say, udp's overlay route and would keep taking the traffic to
    those peers. `vxlan_only` limits it to routes into flannel.<N> vxlan devices (alloc:
    routes via the external interface may be those of the tool that routes for it).
    Refusals are logged, not raised: the data path works for every other peer. A vxlan
    device left without routes stays (another network's vxlan backend on this host may
    use it, even while no route points into it yet): one info line says so. Returns how
    many routes were removed."""
    try:
        devices = netlink.flannel_vxlan_links()
        state = netlink.read_state()
    except BackendError as exc:
        log.error("%s backend: cannot look for routes an earlier backend left: %s", backend, exc)
        return 0
    removed, links = 0, set()
    for route in foreign_routes(state, config, own_subnet, own_links,
                                devices if vxlan_only else None):
        try:
            removed += netlink.remove_route(route.dst, route.oif, route.gateway, state=state)
        except BackendError as exc:
            log.error("%s backend: failed to remove route %s an earlier backend left: %s",
                      backend, route, exc)
        links.add(route.oif)
    if removed:
        log.info("%s backend: removed %d route(s) to peers of %s that an earlier backend left",
                 backend, removed, config.network)
    in_use = {route.oif for routes in state.routes.values() for route in routes}
    for index in sorted((links & devices.keys()) - in_use):
        log.info("vxlan device %s is left in place with no route into it (another network may "
                 "use it; `ip link del %s` if none does)", devices[index], devices[index])
    return removed


def describe(value: Any) -> str:
    """A short printable form of untrusted lease data for a log line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Rechecker:
    """A named thread that calls `fix()` when the kernel reports a change to the backend's
    links (a route or neighbour deleted or replaced, a link going down or up), at most once
    per `interval` seconds, and in any case every FULL_CHECK seconds; while `fix` fails, and
    where the notifications cannot be had, every `interval` seconds. It ends when the
    daemon's `stop` or halt() (the backend's stop) is set. `watch()` gives the ChangeMonitor
    to wait on when the thread starts (None: poll). `fix` returns how many entries it
    repaired and raises BackendError while the kernel refuses: a run of failures is logged
    once when it starts and once when it ends, never every interval."""

    FULL_CHECK = 60.0
    _TICK = 1.0  # how often a sleeping thread looks at the daemon's stop event

    def __init__(self, name: str, what: str, fix: Callable[[], int], interval: float,
                 watch: Optional[Callable[[], Optional[ChangeMonitor]]] = None):
        self.name, self.what, self.fix, self.interval = name, what, fix, interval
        self.watch = watch
        self.checks = 0  # calls of fix, for tests and debugging
        self._thread: Optional[threading.Thread] = None
        self._stop: Optional[threading.Event] = None
        self._halt = threading.Event()  # set by halt(), so that a backend stops promptly
        self._wake: Optional[tuple] = None  # a socket pair: halt() wakes the thread at once

    def start(self, stop: threading.Event) -> None:
        """Start the thread; a running one stays (a new lease for a running backend)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = stop
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def halt(self) -> None:
        self._halt.set()
        if self._wake is not None:
            with contextlib.suppress(OSError):  # the thread has ended and closed it
                self._wake[1].send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        monitor = self._open_monitor()
        failing, last = False, time.monotonic()
        try:
            while True:
                if monitor is None or failing:
                    woke = self._sleep(last + self.interval, None)
                else:
                    woke = self._sleep(last + self.FULL_CHECK, monitor)
                    # a burst of changes is one check, not one per notification
                    woke = woke and self._sleep(last + self.interval, None)
                if not woke:
                    return
                if monitor is not None:
                    monitor.drain()  # what the check below sees needs no second check
                last = time.monotonic()
                failing = self._check(failing)
        finally:
            if monitor is not None:
                monitor.close()
            for end in self._wake:
                end.close()

    def _open_monitor(self) -> Optional[ChangeMonitor]:
        if self.watch is None:
            return None
        try:
            return self.watch()
        except OSError as exc:
            log.warning("no kernel change notifications for %s (%s): checking every %.0f s",
                        self.what, exc, self.interval)
            return None

    def _sleep(self, deadline: float, monitor: Optional[ChangeMonitor]) -> bool:
        """Wait until `deadline` or, with a monitor, a change it reports; False when the
        thread must end."""
        fds = [self._wake[0]] + ([monitor] if monitor is not None else [])
        while not self._halt.is_set() and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            ready, _, _ = select.select(fds, [], [], min(remaining, self._TICK))
            if monitor is not None and monitor in ready and monitor.drain():
                return True
        return False

    def _check(self, failing: bool) -> bool:
        """One call of fix; whether it failed."""
        self.checks += 1
        try:
            fixed = self.fix()
        except BackendError as exc:
            if not failing:
                log.warning("cannot restore %s yet (will retry): %s", self.what, exc)
            return True
        except Exception:  # a bug must not end restoration for good: say so, keep trying
            if not failing:
                log.exception("restoring %s failed (will retry)", self.what)
            return True
        if failing:
            log.info("%s are restored", self.what)
        elif fixed:
            log.info("restored %d %s", fixed, self.what)
        return False
