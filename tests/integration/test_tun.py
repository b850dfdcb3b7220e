"""flannel.dataplane.tun on a real TUN device inside a namespace this test creates."""

from __future__ import annotations

import json
import os
import select
import subprocess
import uuid
from ipaddress import IPv4Interface, IPv4Network

import pytest

from flannel.dataplane.tun import configure_tun, open_tun
from flannel.errors import BackendError
from tests.support import ippkt
from tests.support.nsagent import netns, sh
from tests.support.nsthread import run_in_netns

pytestmark = [
    pytest.mark.needs_root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates a namespace and a TUN device"),
]

ADDRESS = IPv4Interface("10.10.96.0/16")
OVERLAY = IPv4Network("10.10.0.0/16")


@pytest.fixture
def ns():
    with netns(f"fpx{uuid.uuid4().hex[:6]}tun") as name:
        yield name


def _link(ns: str, name: str) -> dict:
    return json.loads(sh(ns, f"ip -j addr show dev {name}"))[0]


def test_open_configure_reconfigure_and_close(ns):
    tun = run_in_netns(ns, open_tun, "flannel0")
    try:
        assert tun.name == "flannel0" and tun.index > 0
        for _ in range(2):  # the second run must change nothing and fail on nothing
            run_in_netns(ns, configure_tun, tun, ADDRESS, 1472, OVERLAY)
            link = _link(ns, "flannel0")
            assert link["mtu"] == 1472 and "UP" in link["flags"]
            assert link["link_type"] == "none"  # a TUN (layer 3), not a TAP
            addrs = [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"]
            assert addrs == [("10.10.96.0", 16)]
            routes = sh(ns, "ip -4 route show dev flannel0")
            assert routes.count("10.10.0.0/16") == 1
            assert sh(ns, "sysctl -n net.ipv4.conf.flannel0.accept_local").strip() == "1"
        with pytest.raises(BackendError, match="in use"):
            run_in_netns(ns, open_tun, "flannel0")
    finally:
        tun.close()
    assert "flannel0" not in sh(ns, "ip -o link show")  # the device goes with the fd


def test_reads_bare_ip_packets_without_packet_information(ns):
    with run_in_netns(ns, open_tun, "fpx0") as tun:
        run_in_netns(ns, configure_tun, tun, ADDRESS, 1472, OVERLAY)
        subprocess.run(["ip", "netns", "exec", ns, "ping", "-c1", "-W1", "10.10.5.5"],
                       capture_output=True, timeout=30)
        deadline_rounds = 20
        pkt = None
        while deadline_rounds and pkt is None:
            ready, _, _ = select.select([tun.fd], [], [], 0.5)
            if ready:
                data = os.read(tun.fd, 65535)
                if data[0] >> 4 == 4:  # skip IPv6 noise the kernel may send
                    pkt = ippkt.parse(data)
            deadline_rounds -= 1
        assert pkt is not None, "no IPv4 packet came out of the TUN"
        assert (str(pkt.src), str(pkt.dst), pkt.proto) == ("10.10.96.0", "10.10.5.5", ippkt.ICMP)
        assert pkt.header_ok and pkt.icmp_type == 8


def test_bad_names_are_refused():
    with pytest.raises(BackendError, match="TUN name"):
        open_tun("x" * 16)
