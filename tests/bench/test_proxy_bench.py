"""Benchmarks of the udp data path: Go's one-packet-per-system-call design (batch=1) against
batched system calls (recvmmsg/sendmmsg, UDP GSO/GRO), measured side by side in one run and
printed as ratios. See README.md here for figures.

Not timed tests (nothing asserts a speed): run with `make bench` or
`python -m pytest -s -m bench tests/bench`.

1. `test_proxy_ring_packets_per_second`: the C loop alone. Two proxies form a ring through
   a datagram socketpair (standing in for the TUN) and two UDP sockets on loopback:
   A reads a packet from its "TUN", sends it to B over UDP, B writes it to its "TUN", which is
   the other end of A's, and so on until the TTL (two decrements per lap) runs out. Printed:
   forwarding operations per second (wall clock, noisy on a shared machine) and per CPU
   second of the two proxy threads (the cost per packet, steadier), batch=1 being Go's design.
2. `test_iperf3_over_udp_overlay`: the real thing, two namespaces each running a UdpBackend,
   iperf3 TCP between their flannel0 addresses (needs root and iperf3).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel.dataplane.proxy import Proxy
from tests.support import ippkt
from tests.support.nsagent import sh

pytestmark = pytest.mark.bench

BATCHES = (1, 8, 32)
ROUNDS = 3  # interleaved, best of each: the machine is shared and noisy


SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # beyond net.core.*mem_max (root only)


def _big_buffers(sock: socket.socket) -> socket.socket:
    """64 MiB socket buffers, so that the packets in flight fit in every queue of the ring."""
    for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, 64 << 20)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, 64 << 20)
    return sock


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return _big_buffers(sock)


def _cpu_ns(thread) -> int:
    """CPU time a (still running) thread has used, from the scheduler's own accounting."""
    with open(f"/proc/self/task/{thread.native_id}/schedstat") as f:
        return int(f.read().split()[0])


def _ring_run(batch: int, packets: int, size: int, ttl: int, cycles: int,
              timeout: float = 60.0) -> dict:
    """Two proxies in a ring (see the module docstring) carrying `packets` packets of `size`
    bytes until their TTL runs out, `cycles` times over: forwarding operations per second
    and per CPU second."""
    tun_a, tun_b = map(_big_buffers, socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM))
    udp_a, udp_b = _udp(), _udp()
    net = IPv4Network("10.99.0.0/16")
    a = Proxy(tun_a.fileno(), udp_a.fileno(), IPv4Address("10.98.0.0"), 1500, batch)
    b = Proxy(tun_b.fileno(), udp_b.fileno(), IPv4Address("10.97.0.0"), 1500, batch)
    try:
        a.set_route(net, IPv4Address("127.0.0.1"), udp_b.getsockname()[1])
        b.set_route(net, IPv4Address("127.0.0.1"), udp_a.getsockname()[1])
        pkt = ippkt.udp_packet("10.98.0.1", "10.99.0.1", b"b" * (size - 28), ttl=ttl)
        for _ in range(packets):  # the first cycle is queued for A before the loops start
            tun_b.send(pkt)
        start = time.perf_counter()
        a.start(name="bench-proxy-a")
        b.start(name="bench-proxy-b")
        deadline = time.monotonic() + timeout
        for cycle in range(cycles):
            if cycle:
                for _ in range(packets):
                    tun_b.send(pkt)
            while True:
                ca, cb = a.counters(), b.counters()
                lost = sum(c["drop_ttl"] + c["drop_send_error"] for c in (ca, cb))
                if lost >= packets * (cycle + 1) or time.monotonic() > deadline:
                    break
                time.sleep(0.001)
        elapsed = time.perf_counter() - start
        cpu = (_cpu_ns(a._thread) + _cpu_ns(b._thread)) / 1e9
        ops = ca["udp_tx_packets"] + cb["tun_tx_packets"]
        return {"pps": ops / elapsed, "per_cpu": ops / cpu,
                "per_call": ops / max(ca["syscalls"] + cb["syscalls"], 1),
                "send_errors": ca["drop_send_error"] + cb["drop_send_error"]}
    finally:
        a.close()
        b.close()
        for s in (tun_a, tun_b, udp_a, udp_b):
            s.close()


# (name, packets, ttl, cycles): a steady ring of 256 packets making 127 laps each, and a
# backlog of 20000 queued packets that each cross once (A, B) and die at A: how fast a full
# queue drains
SCENARIOS = [("ring", 256, 255, 5), ("backlog", 20000, 3, 1)]


@pytest.mark.parametrize("size", [64, 1400])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_proxy_ring_packets_per_second(size, scenario):
    name, packets, ttl, cycles = scenario
    best: dict = {}
    for _ in range(ROUNDS):
        for batch in BATCHES:
            result = _ring_run(batch, packets, size, ttl, cycles)
            if batch not in best or result["pps"] > best[batch]["pps"]:
                best[batch] = result
    base = best[1]
    print(f"\nproxy {name}, {size}-byte packets, {packets} packets (best of {ROUNDS}):")
    for batch in BATCHES:
        r = best[batch]
        print(f"  batch={batch:<3} {r['pps']:>10,.0f} pkt/s (x{r['pps'] / base['pps']:.2f})"
              f"  {r['per_cpu']:>10,.0f} pkt/CPU-s (x{r['per_cpu'] / base['per_cpu']:.2f})"
              f"  {r['per_call']:.2f} pkt/syscall  send errors {r['send_errors']}")
    assert all(r["pps"] > 0 for r in best.values())


# ---------------------------------------------------------------------------- iperf3


@pytest.fixture(scope="module")
def overlay():
    if os.geteuid() != 0:
        pytest.skip("needs root: creates namespaces and TUN devices")
    if not shutil.which("iperf3"):
        pytest.skip("needs iperf3")
    from tests.integration.test_udp_backend import two_hosts

    with two_hosts() as hosts:
        yield hosts


def _iperf3(hosts, seconds: int = 3) -> float:
    """Received bits/s of an iperf3 TCP run from a's flannel0 address to b's."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", hosts["b"].ns, "iperf3", "-s", "-1", "-B", "10.10.2.0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if ":5201" in sh(hosts["b"].ns, "ss -tln"):
                break
            time.sleep(0.1)
        out = sh(hosts["a"].ns, f"iperf3 -J -c 10.10.2.0 -B 10.10.1.0 -t {seconds}")
        return json.loads(out)["end"]["sum_received"]["bits_per_second"]
    finally:
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_iperf3_over_udp_overlay(overlay):
    from tests.integration.test_udp_backend import start_pair

    results: dict = {}
    for _ in range(2):
        for batch in (1, 32):
            for host in overlay.values():
                host.stop()
            start_pair(overlay, batch)
            bps = _iperf3(overlay)
            results[batch] = max(results.get(batch, 0.0), bps)
    print("\niperf3 TCP over the udp overlay (two namespaces, best of 2 runs of 3 s):")
    for batch, bps in results.items():
        print(f"  batch={batch:<3} {bps / 1e6:>9,.0f} Mbit/s  x{bps / results[1]:.2f} vs batch=1")
    assert all(bps > 0 for bps in results.values())
