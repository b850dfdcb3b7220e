"""The life of one network on this host: wait for a valid config, create the backend,
acquire a lease, publish it (subnet file, ip-masq, READY=1), follow the peers (each snapshot
of them also sweeps the backend's entries of peers that are gone), renew the lease, and
claim it again when it is lost.

Runs as a named thread (`NetworkLoop.run`). Transient store failures are retried forever
with capped back-off; a lease that another host took over is fatal (`on_fatal`), so that the
service manager restarts the daemon and dependants re-read the subnet file. Stopping keeps
the lease in etcd: a restarted daemon gets the same subnet back.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Callable, Iterable, Optional

from flannel.backend import create_backend
from flannel.backend.base import Backend, ExternalInterface
from flannel.errors import (
    ConfigError, FlannelError, LeaseError, LeaseTakenError, NotFoundError,
    RegistryError,
)
from flannel.network.retry import Onceper, Retry
from flannel.network.subnet_env import SubnetEnv, read_subnet, write_subnet_env
from flannel.subnet.manager import SubnetManager
from flannel.subnet.models import REMOVED, Event, Lease, LeaseAttrs

log = logging.getLogger(__name__)

RESERVATION_CHECK = 3600.0  # a reservation never expires; still check hourly that it exists


@dataclass(frozen=True)
class LoopSettings:
    network: str  # "" in single-network mode
    subnet_file: Path
    ip_masq: bool = False
    renew_margin: float = 3600.0  # seconds before expiration
    config_retry: float = 5.0  # seconds between looks at a bad or missing config
    renew_retry: float = 5.0  # cap of the wait between failed renewals
    lease_retry: float = 30.0  # cap of the wait while out of subnets
    watch_timeout: float = 5.0

    @property
    def label(self) -> str:
        return f"network {self.network}" if self.network else "the network"


class _Masquerade:
    """flannel.dataplane.ipmasq, imported only when --ip-masq is on (it runs iptables)."""

    def setup(self, network: IPv4Network, subnet: IPv4Network) -> None:
        from flannel.dataplane import ipmasq

        ipmasq.setup_masquerade(network, subnet)

    def teardown(self, network: IPv4Network, subnet: IPv4Network) -> None:
        from flannel.dataplane import ipmasq

        ipmasq.teardown_masquerade(network, subnet)


class NetworkLoop:
    def __init__(
        self,
        manager: SubnetManager,
        ext_iface: ExternalInterface,
        settings: LoopSettings,
        stop: threading.Event,
        *,
        on_ready: Callable[[str, Lease], None] = lambda network, lease: None,
        on_fatal: Callable[[str], None] = lambda message: None,
        backend_factory: Callable = create_backend,
        masquerade=None,
        clock: Callable[[], float] = time.time,
        sleep: Optional[Callable[[float], bool]] = None,
    ):
        self.manager = manager
        self.ext_iface = ext_iface
        self.settings = settings
        self.stop = stop
        self.on_ready = on_ready
        self.on_fatal = on_fatal
        self.backend_factory = backend_factory
        self.masquerade = masquerade or _Masquerade()
        self.clock = clock
        self.sleep = sleep or self._wait
        self.backend: Optional[Backend] = None
        self.lease: Optional[Lease] = None
        self.attrs: Optional[LeaseAttrs] = None
        self._wake = threading.Event()  # set by the own-lease watch when our lease changes
        # the peer watcher's own stop: set when this loop ends; if the watcher sets it itself
        # (it died), the loop's `stop` is still clear and the guard reports a fatal error
        self._watch_stop = threading.Event()
        self._threads: list = []
        self._peers = None  # the LeaseWatcher, once the lease is published
        self._masq_on: Optional[tuple] = None
        self._shutdown_lock = threading.Lock()
        self._shut = False

    # -- the thread ---------------------------------------------------------

    def run(self) -> None:
        net = self.settings.network
        try:
            self._run()
        except LeaseTakenError as exc:
            message = str(exc) if self._restart_hint() in str(exc) else f"{exc}; {self._restart_hint()}"
            log.error("%s: %s", self.settings.label, message)
            self.on_fatal(message)
        except FlannelError as exc:  # refused for good (a broken data path, a 403): no traceback
            log.error("%s: %s", self.settings.label, exc)
            self.on_fatal(str(exc))
        except Exception as exc:  # a bug: the thread says why and stops the daemon
            log.exception("%s: network loop failed", self.settings.label)
            self.on_fatal(f"network loop of {net or 'the network'} failed: {exc}")
        finally:
            self._watch_stop.set()
            self.shutdown()

    def _run(self) -> None:
        found = self._wait_for_config()
        if found is None:
            return
        config, self.backend = found
        self.attrs = self.backend.lease_attrs()
        prefer = read_subnet(self.settings.subnet_file)
        lease = self._acquire(prefer)
        if lease is None:
            return
        with self._shutdown_lock:
            # a stop that came while etcd was slow to answer has already shut us down (the
            # network retired, its subnet file removed): publishing now would leave a data
            # path, masquerade rules and a subnet file that nobody removes
            if self._shut or self.stop.is_set():
                return
            self._publish(config, lease)
        self._start_watchers(lease.subnet)
        self._keep(lease)

    def _wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; returns True when stopping. Ends early when the own-lease
        watch saw our lease change (the caller then renews at once)."""
        deadline = time.monotonic() + max(0.0, seconds)
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._wake.wait(min(left, 0.25)):
                self._wake.clear()
                return self.stop.is_set()
        return True

    # -- config, backend, lease ----------------------------------------------

    def _wait_for_config(self):
        """(config, backend) once the config is valid and its backend accepts it; None when
        stopped first. A bad config is logged once per change, never acted upon."""
        retry = Retry(f"reading the config of {self.settings.label}", log)
        report = Onceper(log)
        while not self.stop.is_set():
            try:
                config = self.manager.get_network_config(self.settings.network)
                retry.succeeded()
                backend = self.backend_factory(config.backend_type, self.ext_iface, config)
                if report.last:
                    log.info("the config of %s is valid now", self.settings.label)
                log.info("%s: %s backend, network %s", self.settings.label, config.backend_type,
                         config.network)
                return config, backend
            except RegistryError as exc:
                delay = retry.failed(exc)
            except (ConfigError, NotFoundError) as exc:
                retry.succeeded()
                report(f"the config of {self.settings.label} is not usable, waiting for a valid "
                       f"one: {exc}")
                delay = self.settings.config_retry
            if self.sleep(delay):
                return None
        return None

    def _acquire(self, prefer: Optional[IPv4Network]) -> Optional[Lease]:
        retry = Retry(f"acquiring a lease in {self.settings.label}", log)
        report = Onceper(log)
        # out of subnets: slow down up to lease_retry, never hammer etcd
        slow = Retry("", None, initial=self.settings.config_retry, cap=self.settings.lease_retry)
        while not self.stop.is_set():
            try:
                lease = self.manager.acquire_lease(self.settings.network, self.attrs, prefer=prefer)
                retry.succeeded()
                log.info("%s: acquired lease %s", self.settings.label, lease.subnet)
                return lease
            except LeaseTakenError:
                raise
            except RegistryError as exc:
                delay = retry.failed(exc)
            except (LeaseError, ConfigError, NotFoundError) as exc:
                retry.succeeded()
                report(f"{self.settings.label}: cannot acquire a lease, retrying: {exc}")
                delay = slow.failed(exc)
            if self.sleep(delay):
                return None
        return None

    def _publish(self, config, lease: Lease) -> None:
        """Data path, masquerade, subnet file, then readiness: dependants that start on
        READY=1 or on the file find the data path already working."""
        self.lease = lease
        self.backend.start(lease, self.stop)
        if self.settings.ip_masq:
            self.masquerade.setup(config.network, lease.subnet)
            self._masq_on = (config.network, lease.subnet)
        if self.stop.is_set():
            # stopped while the data path was set up (the run's own shutdown removes it): a
            # retired network's file, removed meanwhile, must not come back
            return
        env = SubnetEnv(config.network, lease.subnet, self.backend.mtu, self.settings.ip_masq)
        write_subnet_env(self.settings.subnet_file, env)
        log.info("%s: wrote %s (subnet %s, MTU %d)", self.settings.label,
                 self.settings.subnet_file, lease.subnet, env.mtu)
        self.on_ready(self.settings.network, lease)

    # -- watchers -------------------------------------------------------------

    def _start_watchers(self, subnet: IPv4Network) -> None:
        from flannel.subnet.watch import LeaseWatcher

        peers = LeaseWatcher(self.manager, self.settings.network, subnet, self._apply,
                             self._watch_stop, timeout=self.settings.watch_timeout,
                             on_snapshot=self._sync)
        self._peers = peers
        base = f"net-{self.settings.network or 'default'}"
        for name, target in ((f"{base}-peers", peers.run), (f"{base}-lease", self._watch_own)):
            thread = threading.Thread(target=self._guard(target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            name = threading.current_thread().name
            try:
                target()
            except Exception as exc:
                log.exception("%s: thread %s failed", self.settings.label, name)
                self.on_fatal(f"{name} failed: {exc}")
                return
            if not self.stop.is_set():
                self.on_fatal(f"{name} ended while {self.settings.label} was running")

        return run

    def _apply(self, events: Iterable[Event]) -> None:
        try:
            self.backend.apply(list(events))
        except FlannelError as exc:
            # the watcher counts these events as delivered: have it deliver everything
            # again from a fresh snapshot (applying is idempotent), or the peers of a
            # failed batch would stay unprogrammed until some later snapshot
            log.error("%s: failed to apply peer changes, applying all peers again: %s",
                      self.settings.label, exc)
            self._peers.request_resync()

    def _sync(self, leases: list) -> None:
        """Every snapshot of the peers: the backend sweeps entries of peers that are gone
        (after a restart, the peer watcher's first batch can only add)."""
        try:
            self.backend.sync(leases)
        except FlannelError as exc:
            log.error("%s: failed to remove entries of departed peers: %s", self.settings.label, exc)

    def _watch_own(self) -> None:
        """Wake the renew loop as soon as our lease disappears or changes hands, so that a
        lease deleted behind our back is claimed again at once, not at the next renewal."""
        subnet = self.lease.subnet
        retry = Retry(f"watching our lease {subnet}", log)
        cursor = None
        while not self.stop.is_set():
            try:
                result = self.manager.watch_lease(self.settings.network, subnet, cursor,
                                                  self.settings.watch_timeout)
            except FlannelError as exc:
                # any refusal is transient here (a server that answers 404 or 500 while the
                # config is rewritten, an unreachable store): the renew loop decides what a
                # lost lease means. Not self.sleep: that would swallow a wake-up meant for it
                if self.stop.wait(retry.failed(exc)):
                    return
                continue
            retry.succeeded()
            if result.snapshot is not None or cursor is None:
                if not any(self._ours(le) for le in result.snapshot or ()):
                    self._wake.set()
            for event in result.events:
                if event.type == REMOVED or not self._ours(event.lease):
                    self._wake.set()
            cursor = result.cursor if result.cursor is not None else cursor

    def _ours(self, lease: Optional[Lease]) -> bool:
        return (lease is not None and lease.subnet == self.lease.subnet
                and lease.attrs.public_ip == self.attrs.public_ip)

    # -- renewal and loss -------------------------------------------------------

    def renew_delay(self, lease: Lease) -> float:
        if lease.expiration is None:
            return RESERVATION_CHECK
        return max(0.0, lease.expiration.timestamp() - self.settings.renew_margin - self.clock())

    def _keep(self, lease: Lease) -> None:
        while not self.stop.is_set():
            if self.sleep(self.renew_delay(lease)):
                return
            lease = self._renew(lease)
            if lease is None:
                return
            self.lease = lease

    def _renew(self, lease: Lease) -> Optional[Lease]:
        retry = Retry(f"renewing lease {lease.subnet}", log, cap=self.settings.renew_retry)
        while not self.stop.is_set():
            try:
                renewed = self.manager.renew_lease(self.settings.network, lease)
                retry.succeeded()
                log.info("%s: renewed lease %s until %s", self.settings.label, lease.subnet,
                         renewed.expiration or "never (reservation)")
                return renewed
            except NotFoundError:
                return self._reclaim(lease.subnet)
            except LeaseTakenError:
                raise
            except (RegistryError, LeaseError) as exc:  # LeaseError: lost compare-and-swap races
                if self.sleep(retry.failed(exc)):
                    return None
        return None

    def _reclaim(self, subnet: IPv4Network) -> Optional[Lease]:
        """Our lease expired or was deleted: take the same subnet again if it is free.
        Raises LeaseTakenError when another host holds it now."""
        log.warning("%s: lease %s was lost (expired or deleted); claiming it again",
                    self.settings.label, subnet)
        retry = Retry(f"claiming lease {subnet} again", log)
        while not self.stop.is_set():
            try:
                current = self.manager.watch_lease(self.settings.network, subnet, None,
                                                   self.settings.watch_timeout)
                for holder in current.snapshot or ():
                    if holder.subnet == subnet and holder.attrs.public_ip != self.attrs.public_ip:
                        raise self._taken(subnet, f"host {holder.attrs.public_ip}")
                lease = self.manager.acquire_lease(self.settings.network, self.attrs, prefer=subnet)
            except (RegistryError, NotFoundError, ConfigError) as exc:
                # etcd trouble, or the config is missing or invalid for now (being rewritten):
                # wait for it rather than give up the subnet
                if self.sleep(retry.failed(exc)):
                    return None
                continue
            except LeaseTakenError:
                raise
            except LeaseError as exc:
                raise self._taken(subnet, "another host") from exc
            if lease.subnet != subnet:
                raise self._taken(subnet, f"another host (we were given {lease.subnet})")
            log.info("%s: lease %s is ours again", self.settings.label, subnet)
            return lease
        return None

    def _taken(self, subnet: IPv4Network, holder: str) -> LeaseTakenError:
        return LeaseTakenError(
            f"lease {subnet} was lost and {holder} now holds the subnet; {self._restart_hint()}"
        )

    def _restart_hint(self) -> str:
        return (f"exiting so that the service manager restarts flanneld and dependants re-read "
                f"{self.settings.subnet_file}")

    # -- stopping ----------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the backend and remove masquerade rules (once, from whichever thread comes
        first); the lease stays in etcd and the subnet file stays for a restart."""
        if not self._shutdown_lock.acquire(timeout=1.0):
            # the run thread holds it (publishing): its own shutdown, when it sees the stop,
            # removes what it set up
            log.debug("%s: shutdown left to the network's own thread", self.settings.label)
            return
        try:
            if self._shut:
                return
            self._shut = True
            # the rules first: stopping a backend may take seconds (its threads), and the
            # stop watchdog must not cut the teardown of the rules short
            if self._masq_on:
                try:
                    self.masquerade.teardown(*self._masq_on)
                except Exception as exc:
                    log.error("%s: failed to remove masquerade rules: %s", self.settings.label, exc)
            if self.backend is not None and self.lease is not None:
                try:
                    self.backend.stop()
                except Exception as exc:
                    log.error("%s: failed to stop the backend: %s", self.settings.label, exc)
        finally:
            self._shutdown_lock.release()

    def join(self, deadline: float, most: float = 0.5) -> None:
        """Give the watch threads a moment; they hold nothing that needs cleaning up (daemon
        threads, possibly parked in a long poll), so the daemon does not wait them out."""
        deadline = min(deadline, time.monotonic() + most)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
