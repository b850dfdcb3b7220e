"""Kernel change notifications: a raw rtnetlink socket joined to the link, neighbour and
IPv4 route multicast groups, telling whether something happened to the links a backend
cares about since the last look.

The backends' re-check threads wait on this instead of dumping a thousand routes every few
seconds: a route or neighbour deleted by someone, an entry replaced, a link going down (the
kernel drops IPv4 routes through a link that goes down without a notification per route, so
the link's own notification is the signal). Only the fixed message headers and one route
attribute are read, so this needs no netlink library. Lost notifications (the socket buffer
overflowed during a storm) count as a change.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Iterable, Iterator, Tuple

RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_ROUTE = 0x40

RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
RTA_OIF = 4

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port
_IFINDEX = struct.Struct("=i")  # ifinfomsg.ifi_index and ndmsg.ndm_ifindex sit at offset 4
_RTMSG_LEN = 12
_RTATTR = struct.Struct("=HH")  # length, type
_RCVBUF = 1 << 20  # a link going down with a thousand peers is a burst of notifications


def _align(n: int) -> int:
    return (n + 3) & ~3


def messages(data: bytes) -> Iterator[Tuple[int, bytes]]:
    """(type, payload) of each netlink message in one datagram; a truncated tail is dropped."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _port = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            return
        yield mtype, data[offset + _NLMSGHDR.size:offset + length]
        offset += _align(length)


def route_oif(payload: bytes) -> int:
    """The RTA_OIF of a route message, 0 when it has none (multipath, blackhole)."""
    offset = _RTMSG_LEN
    while offset + _RTATTR.size <= len(payload):
        length, atype = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size:
            return 0
        if atype == RTA_OIF and length >= _RTATTR.size + 4:
            return _IFINDEX.unpack_from(payload, offset + _RTATTR.size)[0]
        offset += _align(length)
    return 0


def message_link(mtype: int, payload: bytes) -> Tuple[str, int]:
    """("link" | "neighbour" | "route" | "", ifindex) of a notification; ("", 0) for others."""
    if mtype in (RTM_NEWLINK, RTM_DELLINK) and len(payload) >= 8:
        return "link", _IFINDEX.unpack_from(payload, 4)[0]
    if mtype in (RTM_NEWNEIGH, RTM_DELNEIGH) and len(payload) >= 8:
        return "neighbour", _IFINDEX.unpack_from(payload, 4)[0]
    if mtype in (RTM_NEWROUTE, RTM_DELROUTE) and len(payload) >= _RTMSG_LEN:
        return "route", route_oif(payload)
    return "", 0


class ChangeMonitor:
    """Notifications about `links` (their state, and routes through them) and about the
    neighbour and forwarding entries of `neighbour_links`. drain() reads what is pending
    without blocking and says whether any of it concerns them; fileno() is for select()."""

    def __init__(self, links: Iterable[int], neighbour_links: Iterable[int] = ()):
        self.links = frozenset(links)
        self.neighbour_links = frozenset(neighbour_links)
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                             socket.NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            sock.bind((0, RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE))
        except OSError:
            sock.close()
            raise
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> bool:
        changed = False
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return changed
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                changed = True  # notifications were lost: assume the worst
                continue
            changed |= any(self.concerns(mtype, payload) for mtype, payload in messages(data))

    def concerns(self, mtype: int, payload: bytes) -> bool:
        kind, index = message_link(mtype, payload)
        if kind == "neighbour":
            return index in self.neighbour_links
        return bool(kind) and index in self.links

    def close(self) -> None:
        self._sock.close()
