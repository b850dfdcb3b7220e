"""A C proxy wired to a socketpair standing in for its TUN, for data-path tests.

The socketpair carries one datagram per packet, as a TUN with IFF_NO_PI reads and writes:
the test writes exact packets into the proxy's "TUN" (`Rig.tun`) and reads what the proxy
writes back, while peers are real UDP sockets on loopback.
"""

from __future__ import annotations

import socket
import time
from ipaddress import IPv4Address, IPv4Network

from flannel.dataplane.proxy import Proxy

TUN_ADDR = IPv4Address("10.10.1.0")
MTU = 1472
PEER_NET = IPv4Network("10.10.2.0/24")


class Rig:
    """A running proxy, its TUN stand-in (`tun`: the test's end) and one peer socket."""

    def __init__(self, batch: int):
        self.tun, self._tun_proxy_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.udp = udp_socket()
        self.peer = udp_socket()
        self.tun.settimeout(5)
        self.proxy = Proxy(self._tun_proxy_end.fileno(), self.udp.fileno(), TUN_ADDR, MTU, batch)
        self.proxy.set_route(PEER_NET, IPv4Address("127.0.0.1"), self.peer.getsockname()[1])
        self.proxy.start(name="test-udp-proxy")

    @property
    def proxy_addr(self):
        return self.udp.getsockname()

    def from_peer(self, pkt: bytes) -> None:
        self.peer.sendto(pkt, self.proxy_addr)

    def close(self) -> None:
        try:
            self.proxy.close()
        finally:
            for sock in (self.tun, self._tun_proxy_end, self.udp, self.peer):
                sock.close()


def udp_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(5)
    return sock


def settled(proxy: Proxy, timeout: float = 10.0, **expected: int) -> dict:
    """The counters once they show `expected` (the loop counts a packet just after it has
    handed it on, so a test may see the packet first), or as they are after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        counters = proxy.counters()
        if all(counters[k] == v for k, v in expected.items()) or time.monotonic() > deadline:
            return counters
        time.sleep(0.005)
