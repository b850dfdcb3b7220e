"""Runs the network loops of this host: one for the default network (single-network mode,
writing --subnet-file), or one per network named by --networks and/or found by
--watch-networks (multi-network mode, writing <subnet-dir>/<network>.env).

The supervisor sits in the calling thread until the daemon's stop Event is set, hands the
stop on to every loop, and then waits for them a bounded time so that the daemon exits
promptly whatever state a loop is in. `status` is 1 after a fatal error, else 0.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

from flannel import systemd
from flannel.backend.base import ExternalInterface
from flannel.network.loop import LoopSettings, NetworkLoop
from flannel.network.subnet_env import remove_subnet_env
from flannel.subnet.manager import SubnetManager
from flannel.subnet.models import Lease

log = logging.getLogger(__name__)

STOP_GRACE = 3.0  # seconds the loops get to finish after a stop request


class _Running:
    def __init__(self, loop: NetworkLoop, thread: threading.Thread, stop: threading.Event):
        self.loop, self.thread, self.stop = loop, thread, stop


class Supervisor:
    def __init__(
        self,
        manager: SubnetManager,
        ext_iface: ExternalInterface,
        opts,
        stop: threading.Event,
        *,
        loop_factory: Callable[..., NetworkLoop] = NetworkLoop,
        notify: Callable[[str], object] = systemd.notify,
        watch_timeout: float = 5.0,
    ):
        self.manager = manager
        self.ext_iface = ext_iface
        self.opts = opts
        self.stop = stop
        self.loop_factory = loop_factory
        self.notify = notify
        self.watch_timeout = watch_timeout
        self.status = 0
        self._lock = threading.Lock()
        self._running: Dict[str, _Running] = {}
        self._ready = False
        self._allowed = set(opts.networks or ())
        # the network watcher's own stop, set when the daemon stops: a watcher that dies sets
        # it itself, while the daemon's `stop` is still clear, and _guarded reports that
        self._watch_stop = threading.Event()

    @property
    def multi(self) -> bool:
        return bool(self.opts.networks) or bool(self.opts.watch_networks)

    def subnet_file(self, network: str) -> Path:
        if not network:
            return Path(self.opts.subnet_file)
        return Path(self.opts.subnet_dir) / f"{network}.env"

    # -- running -----------------------------------------------------------------

    def run(self) -> int:
        """Blocks until the stop Event is set; returns the exit status."""
        if not self.multi:
            self._start("")
        elif self.opts.watch_networks:
            self._start_network_watcher()
        else:
            for name in self.opts.networks:
                self._start(name)
        while not self.stop.wait(0.2):
            pass
        self._stop_all()
        return self.status

    def _start_network_watcher(self) -> None:
        from flannel.subnet.watch import NetworkWatcher

        watcher = NetworkWatcher(self.manager, self._networks_changed, self._watch_stop,
                                 timeout=self.watch_timeout)
        which = ", ".join(sorted(self._allowed)) if self._allowed else "all networks"
        log.info("watching for networks under the prefix (%s)", which)
        thread = threading.Thread(target=self._guarded(watcher.run), name="networks-watch",
                                  daemon=True)
        thread.start()

    def _networks_changed(self, added: Iterable[str], removed: Iterable[str]) -> None:
        for name in sorted(removed):
            if self._wanted(name):
                self._retire(name)
        for name in sorted(added):
            if self._wanted(name):
                self._start(name)

    def _wanted(self, name: str) -> bool:
        return not self._allowed or name in self._allowed

    def _start(self, network: str) -> None:
        with self._lock:
            if network in self._running or self.stop.is_set():
                return
            stop = threading.Event()
            settings = LoopSettings(
                network=network,
                subnet_file=self.subnet_file(network),
                ip_masq=bool(self.opts.ip_masq),
                renew_margin=60.0 * self.opts.subnet_lease_renew_margin,
                watch_timeout=self.watch_timeout,
            )
            loop = self.loop_factory(self.manager, self.ext_iface, settings, stop,
                                     on_ready=self._on_ready, on_fatal=self._on_fatal)
            thread = threading.Thread(target=loop.run, name=f"net-{network or 'default'}",
                                      daemon=True)
            self._running[network] = _Running(loop, thread, stop)
            thread.start()
        log.info("started %s", settings.label)

    def _retire(self, network: str) -> None:
        """A network disappeared from etcd: stop its loop and remove its subnet file, since
        the subnet it names no longer exists."""
        with self._lock:
            running = self._running.pop(network, None)
        if running is None:
            return
        log.info("network %s was removed; stopping it", network)
        running.stop.set()
        running.thread.join(STOP_GRACE)
        running.loop.shutdown()
        remove_subnet_env(self.subnet_file(network))

    def _stop_all(self) -> None:
        self._watch_stop.set()
        with self._lock:
            running = list(self._running.values())
        for item in running:
            item.stop.set()
        deadline = time.monotonic() + STOP_GRACE
        for item in running:
            item.thread.join(max(0.0, deadline - time.monotonic()))
            if item.thread.is_alive():
                log.warning("%s did not stop in time; leaving it behind", item.thread.name)
            item.loop.shutdown()
            item.loop.join(deadline)

    # -- callbacks from the loops --------------------------------------------------

    def _on_ready(self, network: str, lease: Lease) -> None:
        with self._lock:
            first, self._ready = not self._ready, True
        if first:
            self.notify("READY=1")

    def _on_fatal(self, message: str) -> None:
        self.status = 1
        log.error("stopping flanneld: %s", message)
        self.stop.set()

    def _guarded(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception as exc:
                log.exception("network watch failed")
                self._on_fatal(f"network watch failed: {exc}")
                return
            if not self.stop.is_set():  # it died and said why: exit 1, for Restart=on-failure
                self._on_fatal("the network watch ended while flanneld was running")

        return run

    def loop(self, network: str) -> Optional[NetworkLoop]:
        """The running loop of `network` (for tests and diagnostics)."""
        with self._lock:
            running = self._running.get(network)
        return running.loop if running else None
