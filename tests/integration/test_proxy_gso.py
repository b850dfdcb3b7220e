"""Batched forwarding in the C proxy: runs of packets leave as UDP GSO sends and arrive as
UDP GRO joins, and on the wire (read from a second TUN) it is still one bare IP packet per
datagram, exactly as Go flanneld sends them one by one.
"""

from __future__ import annotations

import os
import select
import socket
import uuid
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from flannel.dataplane.proxy import Proxy
from tests.support import ippkt
from tests.support.nsagent import netns
from tests.support.nsthread import run_in_netns
from tests.support.proxyrig import MTU, PEER_NET, TUN_ADDR, settled, udp_socket


def _queued_batch():
    """Packets for two peers, mixed sizes, in the order they wait in the TUN."""
    to_a = [("a", 1000)] * 10 + [("a", 500)] + [("a", 1000)] * 3
    plan = to_a + [("b", 1000), ("b", 1000)] + [("a", 1000)] * 4 + [("a", 1200)] * 2
    return [(peer, ippkt.udp_packet("10.10.1.5", "10.10.2.7" if peer == "a" else "10.10.3.7",
                                    bytes([i]) * (size - 28), ident=i))
            for i, (peer, size) in enumerate(plan)]


def _expected_after_hop(pkt: bytes) -> bytes:
    got = bytearray(pkt)
    got[8] -= 1
    got[10:12] = b"\0\0"
    got[10:12] = ippkt.checksum(bytes(got[:20])).to_bytes(2, "big")
    return bytes(got)


def _send_queued(proxy: Proxy, tun: socket.socket, batch) -> None:
    for _peer, pkt in batch:
        tun.send(pkt)
    proxy.start(name="test-gso-proxy")


SO_NO_CHECK = 11  # UDP without checksums: the kernel then refuses GSO sends (EINVAL)


@pytest.mark.parametrize("gso_refused", [False, True], ids=["gso", "gso-refused"])
def test_gso_runs_leave_as_the_very_datagrams_of_one_by_one_sends(gso_refused):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    udp, peer_a, peer_b = udp_socket(), udp_socket(), udp_socket()
    if gso_refused:
        udp.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    try:
        with Proxy(a.fileno(), udp.fileno(), TUN_ADDR, MTU, batch=32) as proxy:
            proxy.set_route(PEER_NET, IPv4Address("127.0.0.1"), peer_a.getsockname()[1])
            proxy.set_route(IPv4Network("10.10.3.0/24"), IPv4Address("127.0.0.1"),
                            peer_b.getsockname()[1])
            batch = _queued_batch()
            _send_queued(proxy, b, batch)  # queued first, so the loop reads them in one batch
            for name, sock in (("a", peer_a), ("b", peer_b)):
                want = [_expected_after_hop(pkt) for peer, pkt in batch if peer == name]
                assert [sock.recv(65535) for _ in want] == want
            c = settled(proxy, udp_tx_packets=len(batch))
            assert c["udp_tx_packets"] == len(batch) and c["drop_send_error"] == 0
            # loopback offloads checksums, so GSO is used unless refused (then: one by one)
            assert (c["udp_tx_gso"] == 0) == gso_refused
    finally:
        for s in (a, b, udp, peer_a, peer_b):
            s.close()


def test_gro_joined_datagrams_are_split_into_the_original_packets():
    """Proxy A sends GSO runs over loopback to proxy B, whose socket has UDP GRO on: the
    kernel hands B joined datagrams, and B must write the original packets to its TUN."""
    a_tun, a_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b_tun, b_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    udp_a, udp_b = udp_socket(), udp_socket()
    b_test.settimeout(5)
    batch = [pkt for peer, pkt in _queued_batch() if peer == "a"]
    try:
        with Proxy(a_tun.fileno(), udp_a.fileno(), TUN_ADDR, MTU, batch=32) as a, \
                Proxy(b_tun.fileno(), udp_b.fileno(), IPv4Address("10.10.2.0"), MTU, batch=32) as b:
            a.set_route(PEER_NET, IPv4Address("127.0.0.1"), udp_b.getsockname()[1])
            b.start(name="test-gro-proxy")
            _send_queued(a, a_test, [("a", pkt) for pkt in batch])
            got = [b_test.recv(65535) for _ in batch]
            assert got == [_expected_after_hop(_expected_after_hop(pkt)) for pkt in batch]
            c = settled(b, tun_tx_packets=len(batch))
            assert (c["udp_rx_packets"], c["tun_tx_packets"]) == (len(batch), len(batch))
            assert c["udp_rx_gro"] > 0 and settled(a)["udp_tx_gso"] > 0
    finally:
        for s in (a_tun, a_test, b_tun, b_test, udp_a, udp_b):
            s.close()


@pytest.mark.needs_root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates a namespace and a TUN")
def test_on_the_wire_gso_runs_are_one_bare_ip_packet_per_datagram():
    """The proxy's UDP socket sends through a second TUN: reading that TUN shows exactly what
    goes on the wire, as a Go peer would receive it."""
    from flannel.dataplane.tun import configure_tun, open_tun

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with netns(f"fpx{uuid.uuid4().hex[:6]}gs") as ns:
        wire = run_in_netns(ns, open_tun, "fpxwire")
        udp = None
        try:
            run_in_netns(ns, configure_tun, wire, IPv4Interface("192.168.88.1/24"), 1500,
                         IPv4Network("192.168.88.0/24"))
            udp = run_in_netns(ns, udp_socket, "192.168.88.1")
            with Proxy(a.fileno(), udp.fileno(), TUN_ADDR, MTU, batch=32) as proxy:
                proxy.set_route(PEER_NET, IPv4Address("192.168.88.2"), 8285)
                batch = [(p, pkt) for p, pkt in _queued_batch() if p == "a"]
                _send_queued(proxy, b, batch)
                seen = []
                while len(seen) < len(batch):
                    assert select.select([wire.fd], [], [], 10)[0], f"only {len(seen)} datagrams"
                    outer = os.read(wire.fd, 65535)
                    if outer[0] >> 4 == 4 and outer[9] == ippkt.UDP:
                        seen.append(outer)
                for outer, (_p, pkt) in zip(seen, batch):
                    assert int.from_bytes(outer[22:24], "big") == 8285  # UDP destination port
                    assert outer[28:] == _expected_after_hop(pkt)  # a bare IP packet, nothing else
                c = settled(proxy, udp_tx_packets=len(batch))
                assert (c["udp_tx_packets"], c["drop_send_error"]) == (len(batch), 0)
                assert c["udp_tx_gso"] > 0
        finally:
            if udp is not None:
                udp.close()
            wire.close()
            a.close()
            b.close()
