"""The udp backend (the default): a userspace overlay through the TUN flannel0.

Each IP packet the kernel routes into flannel0 is sent whole, as one UDP datagram, to the
PublicIP of the host whose subnet holds its destination, at the configured `Port` (8285 by
default), exactly as Go flanneld does; datagrams from peers are written back to flannel0.
The packet loop is C (flannel.dataplane.proxy); this module sets up the device and the
socket and turns lease events into the proxy's routes.
"""

from __future__ import annotations

import logging
import socket
import threading
from ipaddress import IPv4Interface
from typing import Iterable, Optional

from flannel.backend.base import Backend, ExternalInterface
from flannel.backend.peers import split_batch, sweep_other_backends
from flannel.dataplane.proxy import DEFAULT_BATCH, Proxy
from flannel.dataplane.tun import Tun, configure_tun, open_tun
from flannel.errors import BackendError, ConfigError
from flannel.subnet.config import NetworkConfig
from flannel.subnet.models import Event, Lease

log = logging.getLogger(__name__)

DEFAULT_PORT = 8285
UDP_OVERHEAD = 28  # outer IPv4 (20) + UDP (8) headers
TUN_NAME = "flannel0"


def port_option(config: NetworkConfig) -> int:
    """Backend option `Port`: an integer 1-65535, default 8285."""
    value = config.backend_option("Port", DEFAULT_PORT)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"Backend option Port must be an integer from 1 to 65535, got {value!r}")
    return value


class UdpBackend(Backend):
    type_name = "udp"
    #: packets per system call in the proxy; 1 reproduces Go flanneld's design
    batch: int = DEFAULT_BATCH

    def __init__(self, ext_iface: ExternalInterface, config: NetworkConfig):
        super().__init__(ext_iface, config)
        self.port = port_option(config)
        self.tun_name = TUN_NAME
        self._tun: Optional[Tun] = None
        self._sock: Optional[socket.socket] = None
        self._proxy: Optional[Proxy] = None

    @property
    def mtu(self) -> int:
        return self.ext_iface.mtu - UDP_OVERHEAD

    def start(self, lease: Lease, stop: threading.Event) -> None:
        self.lease = lease
        # the TUN holds the lease's .0 with the overlay's prefix, e.g. 10.10.96.0/16
        address = IPv4Interface((lease.subnet.network_address, self.config.network.prefixlen))
        try:
            self._tun = open_tun(self.tun_name)
            configure_tun(self._tun, address, self.mtu, self.config.network)
            self._sock = self._bind()
            self._proxy = Proxy(self._tun.fd, self._sock.fileno(), lease.subnet.network_address,
                                self.mtu, self.batch)
        except BaseException:
            self._release()
            raise
        self._proxy.start(stop, name="udp-proxy")
        # every peer route via a gateway is another backend's: it would win over our /16
        sweep_other_backends(self.type_name, self.config, lease.subnet)
        log.info("udp backend: %s on %s, UDP %s:%d, mtu %d", address, self.tun_name,
                 self.ext_iface.iface_addr, self.port, self.mtu)

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((str(self.ext_iface.iface_addr), self.port))
        except OSError as exc:
            sock.close()
            raise BackendError(
                f"failed to bind UDP {self.ext_iface.iface_addr}:{self.port}: {exc.strerror}"
            ) from exc
        return sock

    def apply(self, events: Iterable[Event]) -> None:
        proxy = self._proxy  # once: stop() may clear it meanwhile (the proxy then refuses)
        if proxy is None:
            raise BackendError("udp backend: apply() before start()")
        # as the kernel backends: never our own subnet, nor a lease with our own public IP
        # (a route to ourselves would loop); a peer that turned to another backend type
        # loses its route, so that its packets get ICMP unreachable instead of a black hole
        own = self.lease.subnet if self.lease else None
        removed, added = split_batch(events, own, self.type_name, self.ext_iface.ext_addr)
        for subnet in removed:
            if proxy.del_route(subnet):
                log.info("udp route %s removed", subnet)
        for lease in added:
            proxy.set_route(lease.subnet, lease.attrs.public_ip, self.port)
            log.info("udp route %s -> %s:%d", lease.subnet, lease.attrs.public_ip, self.port)

    def counters(self) -> dict:
        """The proxy's packet and drop counters (empty before start)."""
        proxy = self._proxy
        return proxy.counters() if proxy is not None else {}

    def stop(self) -> None:
        self._release()

    def _release(self) -> None:
        # stop the loop before closing the fds it polls; the TUN goes with its fd, as in Go
        proxy, self._proxy = self._proxy, None
        try:
            if proxy is not None:
                proxy.close()
        finally:
            for closer in (self._sock, self._tun):
                if closer is not None:
                    closer.close()
            self._sock = self._tun = None
