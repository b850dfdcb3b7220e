"""Open and configure the udp backend's TUN device (flannel0).

The device is not persistent: it exists while our fd is open and goes with the process, as
with Go flanneld. Address, MTU, link state and the overlay route are set through the
idempotent functions of flannel.dataplane.netlink, so reconfiguring changes nothing twice.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
from ipaddress import IPv4Interface, IPv4Network

from flannel.dataplane import netlink
from flannel.errors import BackendError

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000  # bare IP packets, no 4-byte packet-information prefix
IFNAMSIZ = 16
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")  # struct ifreq: name, flags, union padding


class Tun:
    """An open TUN device: its fd (one bare IP packet per read/write), name and link index."""

    def __init__(self, fd: int, name: str, index: int):
        self.fd = fd
        self.name = name
        self.index = index

    def close(self) -> None:
        """Close the fd; the kernel removes the (non-persistent) device with it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Tun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_tun(name: str = "flannel0") -> Tun:
    """Create the TUN `name` (IFF_TUN|IFF_NO_PI) in the caller's network namespace."""
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise BackendError(f"TUN name {name!r}: must be 1 to {IFNAMSIZ - 1} bytes")
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise BackendError(f"failed to open {TUN_DEVICE}: {exc.strerror}") from exc
    try:
        answer = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), IFF_TUN | IFF_NO_PI))
        real_name = _IFREQ.unpack(answer)[0].rstrip(b"\0").decode()
        index = socket.if_nametoindex(real_name)
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EBUSY:
            raise BackendError(
                f"failed to create TUN {name}: a device of that name is in use "
                "(another flanneld running?)"
            ) from exc
        raise BackendError(f"failed to create TUN {name}: {exc.strerror}") from exc
    log.info("opened TUN %s (index %d)", real_name, index)
    return Tun(fd, real_name, index)


def configure_tun(tun: Tun, address: IPv4Interface, mtu: int, route: IPv4Network) -> None:
    """MTU, up, `address` as its only IPv4 address, and `route` (the whole overlay) via it."""
    netlink.ensure_link_up(tun.index, mtu)
    netlink.ensure_address(tun.index, address, exclusive=True)
    # explicit, because a route to the overlay from elsewhere would stop the kernel's own
    netlink.ensure_route(route, tun.index)
    _accept_local(tun.name)
    log.info("configured %s: address %s, mtu %d, route %s", tun.name, address, mtu, route)


def _accept_local(name: str) -> None:
    """Let the kernel accept packets from flannel0 whose source is a local address: the
    proxy's ICMP errors come from the TUN address (as Go's do), and without this the kernel
    drops them as martians, so a local sender never learns that a destination is unknown."""
    path = f"/proc/sys/net/ipv4/conf/{name}/accept_local"
    try:
        with open(path, "w") as f:
            f.write("1\n")
    except OSError as exc:
        log.warning("cannot set %s (%s): ICMP errors of the udp proxy will not reach local "
                    "senders", path, exc.strerror)
