"""The one checked wrapper over the C packet loop (the cffi module flannel._proxy).

`Proxy` owns a C `proxy_t` over a TUN fd and a UDP socket fd (the fds stay the caller's).
`start()` runs the blocking C loop in its own named thread (cffi releases the GIL for the
call); routes change and the loop stops through the C command channel, from any thread.
Every C error becomes a BackendError naming the operation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from ipaddress import IPv4Address, IPv4Network
from typing import Optional

from flannel.errors import BackendError

try:
    from flannel._proxy import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the build
    ffi = lib = None
    _IMPORT_ERROR: Optional[ImportError] = exc
else:
    _IMPORT_ERROR = None

log = logging.getLogger(__name__)

#: packets per system call where the kernel allows it; 1 is Go flanneld's design
DEFAULT_BATCH = 32
MAX_BATCH = 128

COUNTER_NAMES = (
    "tun_rx_packets", "tun_rx_bytes", "udp_tx_packets", "udp_tx_bytes", "udp_tx_gso",
    "udp_rx_packets", "udp_rx_bytes", "udp_rx_gro", "tun_tx_packets", "tun_tx_bytes",
    "drop_runt", "drop_oversize", "drop_bad_header", "drop_no_route", "drop_ttl",
    "drop_send_error", "icmp_sent", "read_errors", "polls", "syscalls", "routes",
)


def _check(action: str, rc: int) -> int:
    if rc < 0:
        raise BackendError(f"failed to {action}: {os.strerror(-rc)}")
    return rc


class Proxy:
    """The udp backend's data path: TUN <-> one UDP datagram per IP packet, per peer subnet."""

    def __init__(self, tun_fd: int, udp_fd: int, tun_addr: IPv4Address, mtu: int,
                 batch: int = DEFAULT_BATCH):
        if lib is None:
            raise BackendError(
                f"the C proxy module flannel._proxy is not built ({_IMPORT_ERROR}): "
                "run `python build_ext.py` or `pip install -e .`"
            )
        handle = lib.proxy_new(tun_fd, udp_fd, int(tun_addr), mtu, batch)
        if handle == ffi.NULL:
            raise BackendError(
                f"failed to create the udp proxy (mtu {mtu}, batch {batch}): "
                f"{os.strerror(ffi.errno)}"
            )
        self._p = handle
        self.batch = batch
        self._thread: Optional[threading.Thread] = None
        self._watcher: Optional[threading.Thread] = None
        self.error: Optional[BackendError] = None
        # guards `_p`: close() frees the C state only once no call is in flight (a route
        # change blocks in C, without the GIL, until the loop has applied it)
        self._lock = threading.Condition()
        self._calls = 0
        self._closing = False  # set by close(): no new call may start

    # -- routes ---------------------------------------------------------------

    def set_route(self, subnet: IPv4Network, peer_ip: IPv4Address, peer_port: int) -> None:
        """Send packets for `subnet` to peer_ip:peer_port (replaces an existing route)."""
        with self._handle() as p:
            rc = lib.proxy_set_route(p, int(subnet.network_address), subnet.prefixlen,
                                     int(peer_ip), peer_port)
        _check(f"set the udp route {subnet} -> {peer_ip}:{peer_port}", rc)

    def del_route(self, subnet: IPv4Network) -> bool:
        """Remove the route for `subnet`; True if there was one."""
        with self._handle() as p:
            rc = lib.proxy_del_route(p, int(subnet.network_address), subnet.prefixlen)
        return bool(_check(f"delete the udp route {subnet}", rc))

    def lookup(self, addr: IPv4Address) -> Optional[tuple]:
        """(peer_ip, peer_port) for `addr` by longest prefix, None without a route.
        Only while the loop is not running (a test and debugging aid)."""
        ip, port = ffi.new("uint32_t *"), ffi.new("uint16_t *")
        with self._handle() as p:
            rc = lib.proxy_lookup(p, int(addr), ip, port)
        found = _check(f"look up {addr}", rc)
        return (IPv4Address(ip[0]), port[0]) if found else None

    def counters(self) -> dict:
        """A snapshot of the packet, byte and drop counters by name."""
        out = ffi.new("struct proxy_counters *")
        with self._handle() as p:
            lib.proxy_counters(p, out)
        return {name: getattr(out, name) for name in COUNTER_NAMES}

    # -- life cycle -------------------------------------------------------------

    def start(self, stop: Optional[threading.Event] = None, name: str = "udp-proxy") -> None:
        """Run the loop in a named thread. With `stop`, the loop ends when it is set, and a
        loop that dies of an error logs why and sets it."""
        if self._thread is not None:
            raise BackendError("the udp proxy is already started")
        self._thread = threading.Thread(target=self._run, args=(stop,), name=name, daemon=True)
        self._thread.start()
        if stop is not None:
            self._watcher = threading.Thread(
                target=self._stop_on, args=(stop,), name=f"{name}-stop", daemon=True
            )
            self._watcher.start()

    def _run(self, stop: Optional[threading.Event]) -> None:
        rc = lib.proxy_run(self._p)
        if rc < 0:
            self.error = BackendError(f"udp proxy loop failed: {os.strerror(-rc)}")
            log.error("%s", self.error)
            if stop is not None:
                stop.set()

    def _stop_on(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            if self._thread is None or not self._thread.is_alive():
                return
        try:
            self.stop()
        except BackendError as exc:
            log.error("%s", exc)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and wait for its thread (idempotent)."""
        with self._lock:
            if self._p is None:
                return
            lib.proxy_stop(self._p)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                raise BackendError(f"the udp proxy loop did not stop within {timeout:g}s")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop and free the C state; the fds are left to their owner."""
        self.stop()
        with self._lock:
            if self._p is None:
                return
            self._closing = True
            # the stopped loop has released every route change that waited for it
            if not self._lock.wait_for(lambda: self._calls == 0, timeout):
                self._p = None  # leaked, never freed under a caller
                raise BackendError(f"udp proxy calls still running {timeout:g}s after the stop")
            lib.proxy_free(self._p)
            self._p = None

    @contextlib.contextmanager
    def _handle(self):
        """The C state for one call; close() waits for the call to return before freeing."""
        with self._lock:
            if self._p is None or self._closing:
                raise BackendError("the udp proxy is closed")
            self._calls += 1
            handle = self._p
        try:
            yield handle
        finally:
            with self._lock:
                self._calls -= 1
                self._lock.notify_all()

    def __enter__(self) -> "Proxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
