"""The C proxy (flannel._proxy through flannel.dataplane.proxy) over real sockets.

Most tests stand a datagram socketpair in for the TUN (tests/support/proxyrig.py) with peers
as real UDP sockets on loopback; the last ones use a real TUN inside a namespace with the
kernel's own ping. Batching, UDP GSO/GRO and the bytes on the wire: test_proxy_gso.py.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import threading
import time
import uuid
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from flannel.dataplane.proxy import Proxy
from flannel.errors import BackendError
from tests.support import ippkt
from tests.support.nsagent import netns
from tests.support.nsthread import run_in_netns
from tests.support.proxyrig import MTU, PEER_NET, TUN_ADDR, Rig, settled, udp_socket


@pytest.fixture(params=[1, 32], ids=["batch1", "batch32"])
def rig(request):
    r = Rig(request.param)
    try:
        yield r
    finally:
        r.close()


# ---------------------------------------------------------------------------- forwarding


def test_tun_to_udp_sends_the_whole_packet_with_ttl_decremented(rig):
    pkt = ippkt.echo_request("10.10.1.5", "10.10.2.7", ttl=64)
    rig.tun.send(pkt)
    data, sender = rig.peer.recvfrom(65535)
    got = ippkt.parse(data)
    assert sender == rig.proxy_addr
    assert len(data) == len(pkt)
    assert got.ttl == 63 and got.header_ok
    assert got.payload == ippkt.parse(pkt).payload  # the inner packet is otherwise untouched
    c = settled(rig.proxy, tun_rx_packets=1, udp_tx_packets=1, udp_tx_bytes=len(pkt))
    assert (c["tun_rx_packets"], c["udp_tx_packets"], c["udp_tx_bytes"]) == (1, 1, len(pkt))


def test_udp_to_tun_writes_the_packet_with_ttl_decremented(rig):
    for ttl in (64, 2, 255):
        rig.from_peer(ippkt.udp_packet("10.10.2.7", "10.10.1.5", b"payload", ttl=ttl))
        got = ippkt.parse(rig.tun.recv(65535))
        assert got.ttl == ttl - 1 and got.header_ok
        assert got.payload.endswith(b"payload")
    assert settled(rig.proxy, tun_tx_packets=3)["tun_tx_packets"] == 3


def test_checksum_stays_valid_for_random_headers(rig):
    rnd = random.Random(4)
    for _ in range(50):
        pkt = ippkt.ipv4("10.10.1.%d" % rnd.randint(1, 254), "10.10.2.%d" % rnd.randint(1, 254),
                         rnd.choice([6, 17, 47]), rnd.randbytes(rnd.randint(0, 64)),
                         ttl=rnd.randint(2, 255), ident=rnd.randint(0, 65535))
        rig.tun.send(pkt)
        got = ippkt.parse(rig.peer.recv(65535))
        assert got.header_ok and got.ttl == pkt[8] - 1


def test_ttl_expiring_packets_are_dropped_both_ways(rig):
    rig.tun.send(ippkt.udp_packet("10.10.1.5", "10.10.2.7", b"dies", ttl=1))
    rig.tun.send(ippkt.udp_packet("10.10.1.5", "10.10.2.7", b"lives", ttl=2))
    assert ippkt.parse(rig.peer.recv(65535)).payload.endswith(b"lives")
    rig.from_peer(ippkt.udp_packet("10.10.2.7", "10.10.1.5", b"dies", ttl=1))
    rig.from_peer(ippkt.udp_packet("10.10.2.7", "10.10.1.5", b"dies", ttl=0))
    rig.from_peer(ippkt.udp_packet("10.10.2.7", "10.10.1.5", b"lives", ttl=2))
    got = ippkt.parse(rig.tun.recv(65535))
    assert got.payload.endswith(b"lives") and got.ttl == 1
    assert settled(rig.proxy, drop_ttl=3)["drop_ttl"] == 3


# ---------------------------------------------------------------------------- ICMP errors


def test_unknown_destination_gets_icmp_net_unreachable(rig):
    pkt = ippkt.echo_request("10.10.1.5", "10.10.99.1", ttl=64)
    rig.tun.send(pkt)
    err = ippkt.parse(rig.tun.recv(65535))
    assert (str(err.src), str(err.dst), err.proto) == ("10.10.1.0", "10.10.1.5", ippkt.ICMP)
    assert (err.icmp_type, err.icmp_code) == (3, 0)
    assert err.header_ok and err.icmp_ok
    assert err.payload[8:] == pkt[:28]  # the offending header and 8 bytes of its payload
    c = settled(rig.proxy, drop_no_route=1, icmp_sent=1)
    assert (c["drop_no_route"], c["icmp_sent"], c["udp_tx_packets"]) == (1, 1, 0)


def test_no_icmp_about_icmp_errors_or_non_first_fragments(rig):
    silent = [
        ippkt.ipv4("10.10.1.5", "10.10.99.1", ippkt.ICMP, ippkt.icmp(3, 1, body=b"x" * 28)),
        ippkt.ipv4("10.10.1.5", "10.10.99.1", ippkt.ICMP, ippkt.icmp(11, 0, body=b"x" * 28)),
        ippkt.udp_packet("10.10.1.5", "10.10.99.1", b"tail", frag_offset=185),
        ippkt.udp_packet("0.0.0.0", "10.10.99.1", b"from nobody"),
        ippkt.udp_packet("10.10.1.5", "239.1.2.3", b"multicast"),
    ]
    for pkt in silent:
        rig.tun.send(pkt)
    first_fragment = ippkt.udp_packet("10.10.1.5", "10.10.99.2", b"head", more_fragments=True)
    rig.tun.send(first_fragment)
    err = ippkt.parse(rig.tun.recv(65535))
    assert err.payload[8:] == first_fragment[:28]  # the first answer is about the last packet
    c = settled(rig.proxy, drop_no_route=len(silent) + 1, icmp_sent=1)
    assert (c["drop_no_route"], c["icmp_sent"]) == (len(silent) + 1, 1)


def test_icmp_errors_are_rate_limited():
    rig = Rig(batch=32)
    try:
        for i in range(300):
            rig.tun.send(ippkt.udp_packet("10.10.1.5", f"10.10.99.{i % 250 + 1}", b"x"))
        c = settled(rig.proxy, drop_no_route=300)
        assert c["drop_no_route"] == 300
        # a burst of 50 plus a refill of 100/s for however long this took
        assert 50 <= c["icmp_sent"] < 300
    finally:
        rig.close()


# ---------------------------------------------------------------------------- bad input


def test_runts_oversize_and_bad_headers_are_counted_not_fatal(rig):
    good = ippkt.udp_packet("10.10.1.5", "10.10.2.7", b"still alive")
    v6 = bytes([0x60]) + bytes(39)
    long_total = bytearray(ippkt.udp_packet("10.10.1.5", "10.10.2.7", b"short"))
    long_total[2:4] = (1000).to_bytes(2, "big")
    bad_ihl = bytes([0x4F]) + good[1:]
    for pkt in (b"", b"\x45" * 19, ippkt.udp_packet("10.10.1.5", "10.10.2.7", b"y" * MTU),
                v6, bytes(long_total), bad_ihl, good):
        rig.tun.send(pkt)
    assert ippkt.parse(rig.peer.recv(65535)).payload.endswith(b"still alive")
    for pkt in (b"", b"abc", b"z" * (MTU + 1), b"w" * 9000, v6, good):
        rig.from_peer(pkt)
    assert ippkt.parse(rig.tun.recv(65535)).payload.endswith(b"still alive")
    c = settled(rig.proxy, drop_runt=4, drop_oversize=3, drop_bad_header=4, tun_tx_packets=1)
    assert (c["drop_runt"], c["drop_oversize"], c["drop_bad_header"]) == (4, 3, 4)
    assert (c["udp_tx_packets"], c["tun_tx_packets"]) == (1, 1)
    assert rig.proxy.running


# ---------------------------------------------------------------------------- routes


def test_routes_change_while_running_through_the_command_channel(rig):
    other = udp_socket()
    try:
        net3 = IPv4Network("10.10.3.0/24")
        pkt = ippkt.udp_packet("10.10.1.5", "10.10.3.9", b"to three")
        rig.tun.send(pkt)
        assert ippkt.parse(rig.tun.recv(65535)).icmp_type == 3  # no route yet
        rig.proxy.set_route(net3, IPv4Address("127.0.0.1"), other.getsockname()[1])
        assert rig.proxy.counters()["routes"] == 2
        rig.tun.send(pkt)
        assert other.recv(65535)[20:].endswith(b"to three")
        rig.proxy.set_route(net3, IPv4Address("127.0.0.1"), rig.peer.getsockname()[1])
        rig.tun.send(pkt)
        assert rig.peer.recv(65535)[20:].endswith(b"to three")  # replaced, not added
        assert rig.proxy.del_route(net3) is True
        assert rig.proxy.del_route(net3) is False
        rig.tun.send(pkt)
        assert ippkt.parse(rig.tun.recv(65535)).icmp_type == 3
        assert rig.proxy.counters()["routes"] == 1
    finally:
        other.close()


def test_route_arguments_are_checked():
    rig = Rig(batch=1)
    try:
        with pytest.raises(BackendError, match="set the udp route"):
            rig.proxy.set_route(IPv4Network("10.10.3.0/24"), IPv4Address("127.0.0.1"), 0)
        with pytest.raises(BackendError):
            Proxy(-1, rig.udp.fileno(), TUN_ADDR, MTU)
        with pytest.raises(BackendError, match="batch 0"):
            Proxy(rig.tun.fileno(), rig.udp.fileno(), TUN_ADDR, MTU, batch=0)
        settled(rig.proxy, polls=1)  # the loop has started
        with pytest.raises(BackendError, match="look up"):
            rig.proxy.lookup(IPv4Address("10.10.2.1"))  # only while not running
    finally:
        rig.close()


def _reference_lookup(routes: dict, addr: IPv4Address):
    best = None
    for net, peer in routes.items():
        if addr in net and (best is None or net.prefixlen > best[0].prefixlen):
            best = (net, peer)
    return best[1] if best else None


def test_a_thousand_routes_longest_prefix_match():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    udp = udp_socket()
    rnd = random.Random(7)
    try:
        with Proxy(a.fileno(), udp.fileno(), TUN_ADDR, MTU) as proxy:
            routes = {}
            for i in range(1000):  # 10.16.0.0/24 ... plus overlapping shorter/longer prefixes
                routes[IPv4Network((0x0A100000 + (i << 8), 24))] = (IPv4Address(0xC0A80000 + i), 8285)
            routes[IPv4Network("10.16.0.0/16")] = (IPv4Address("192.168.100.1"), 8285)
            routes[IPv4Network("10.16.7.16/28")] = (IPv4Address("192.168.100.2"), 9000)
            routes[IPv4Network("10.16.9.77/32")] = (IPv4Address("192.168.100.3"), 9001)
            for net, (ip, port) in routes.items():
                proxy.set_route(net, ip, port)
            assert proxy.counters()["routes"] == len(routes)
            for j in range(40):  # delete some /24s so the /16 shows through
                net = IPv4Network((0x0A100000 + (rnd.randrange(1000) << 8), 24))
                assert proxy.del_route(net) == (net in routes)
                routes.pop(net, None)
            probes = [IPv4Address(0x0A100000 + rnd.randrange(1 << 16)) for _ in range(3000)]
            probes += [IPv4Address(x) for x in ("10.16.7.17", "10.16.7.32", "10.16.9.77",
                                                  "10.16.9.78", "10.17.0.1", "10.15.255.255")]
            for addr in probes:
                assert proxy.lookup(addr) == _reference_lookup(routes, addr), addr
    finally:
        for s in (a, b, udp):
            s.close()


def test_lookup_is_used_by_the_running_loop_with_many_routes():
    rig = Rig(batch=32)
    sinks = [udp_socket() for _ in range(4)]
    try:
        for i in range(1000):
            rig.proxy.set_route(IPv4Network((0x0A140000 + (i << 8), 24)), IPv4Address("127.0.0.1"),
                                sinks[i % 4].getsockname()[1])
        for i in random.Random(3).sample(range(1000), 40):
            dst = IPv4Address(0x0A140000 + (i << 8) + 9)
            rig.tun.send(ippkt.udp_packet("10.10.1.5", str(dst), b"n%d" % i))
            assert sinks[i % 4].recv(65535)[20:].endswith(b"n%d" % i)
    finally:
        rig.close()
        for s in sinks:
            s.close()

# ---------------------------------------------------------------------------- life cycle


def test_stop_from_another_thread_is_prompt_and_sticky():
    rig = Rig(batch=1)
    try:
        stopper = threading.Thread(target=rig.proxy.stop, name="stopper")
        stopper.start()
        stopper.join(10)
        assert not stopper.is_alive() and not rig.proxy.running
        assert rig.proxy.error is None
    finally:
        rig.close()


def test_close_waits_for_route_changes_in_flight():
    """A peer watcher may be changing routes while the backend stops: close() frees the C
    state only after those calls returned; later calls are refused, none crashes."""
    rig = Rig(batch=8)
    outcomes = []

    def churn(offset):
        try:
            for i in range(1_000_000):
                subnet = IPv4Network(((10 << 24) | (20 << 16) | ((offset + i) % 250 << 8), 24))
                rig.proxy.set_route(subnet, IPv4Address("127.0.0.1"), 8285)
                rig.proxy.del_route(subnet)
                rig.proxy.counters()
            outcomes.append("never refused")
        except BackendError as exc:
            outcomes.append(str(exc))
        except Exception as exc:  # anything else is the bug this test is about
            outcomes.append(repr(exc))

    threads = [threading.Thread(target=churn, args=(n * 100,), name=f"churn-{n}") for n in range(3)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.3)
    finally:
        rig.close()
    for thread in threads:
        thread.join(10)
    assert outcomes == ["the udp proxy is closed"] * 3


def test_stop_event_ends_the_loop_and_a_dead_tun_sets_it():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # hangs up when b closes
    udp = udp_socket()
    stop = threading.Event()
    proxy = Proxy(a.fileno(), udp.fileno(), TUN_ADDR, MTU)
    try:
        proxy.start(stop)
        stop.set()
        deadline = time.monotonic() + 10
        while proxy.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not proxy.running
        proxy.close()
        # a loop that dies (its TUN went away) logs, keeps the reason and sets the event
        stop.clear()
        proxy = Proxy(a.fileno(), udp.fileno(), TUN_ADDR, MTU)
        proxy.start(stop)
        b.close()
        assert stop.wait(10)
        assert "udp proxy loop failed" in str(proxy.error)
    finally:
        proxy.close()
        for s in (a, b, udp):
            s.close()


# ---------------------------------------------------------------------------- real TUN

@pytest.fixture(scope="module")
def tun_rig():
    """A proxy on a real TUN (10.10.1.0/16) in a fresh namespace, a peer socket on that
    namespace's loopback standing in for the host of 10.10.2.0/24."""
    from flannel.dataplane.tun import configure_tun, open_tun

    with netns(f"fpx{uuid.uuid4().hex[:6]}px") as ns:
        tun = run_in_netns(ns, open_tun, "flannel0")
        udp = run_in_netns(ns, udp_socket)
        peer = run_in_netns(ns, udp_socket)
        proxy = None
        try:
            run_in_netns(ns, configure_tun, tun, IPv4Interface("10.10.1.0/16"), MTU,
                         IPv4Network("10.10.0.0/16"))
            proxy = Proxy(tun.fd, udp.fileno(), TUN_ADDR, MTU, batch=32)
            proxy.set_route(PEER_NET, IPv4Address("127.0.0.1"), peer.getsockname()[1])
            proxy.start(name="test-tun-proxy")
            yield ns, proxy, udp, peer
        finally:
            if proxy is not None:
                proxy.close()
            for closer in (udp, peer, tun):
                closer.close()


def _ping(ns: str, dst: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-n", "-c1", "-W5", *args, dst],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _next_ipv4(sock: socket.socket) -> bytes:
    while True:
        data = sock.recv(65535)
        if data and data[0] >> 4 == 4:
            return data


@pytest.mark.parametrize("size", [56, MTU - 28])
@pytest.mark.needs_root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates a namespace and a TUN")
def test_kernel_ping_through_a_real_tun(tun_rig, size):
    ns, proxy, udp, peer = tun_rig
    ping = _ping(ns, "10.10.2.7", "-s", str(size), "-M", "do")
    try:
        request = _next_ipv4(peer)
        got = ippkt.parse(request)
        assert (str(got.src), str(got.dst), got.icmp_type) == ("10.10.1.0", "10.10.2.7", 8)
        assert got.ttl == 63 and got.header_ok and len(request) == size + 28
        peer.sendto(ippkt.echo_reply_for(request), udp.getsockname())
        out, _ = ping.communicate(timeout=30)
    finally:
        if ping.poll() is None:
            ping.kill()
            ping.wait()
    assert ping.returncode == 0, out
    assert "ttl=63" in out  # the reply left the "peer" with 64 and crossed our proxy


@pytest.mark.needs_root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates a namespace and a TUN")
def test_unknown_destination_answered_to_the_kernel(tun_rig):
    ns, proxy, _udp, _peer = tun_rig
    ping = _ping(ns, "10.10.99.1")
    out, _ = ping.communicate(timeout=30)
    assert ping.returncode != 0
    assert "From 10.10.1.0" in out and "Destination Net Unreachable" in out, out
