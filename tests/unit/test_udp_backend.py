"""UdpBackend without the kernel: options, MTU, lease attributes, and how lease events
become proxy routes (a recording stand-in for the C proxy; the real one is exercised in
tests/integration/test_udp_backend.py)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel.backend.base import ExternalInterface
from flannel.backend.udp import DEFAULT_PORT, UdpBackend
from flannel.errors import BackendError, ConfigError
from flannel.subnet.config import NetworkConfig
from flannel.subnet.models import ADDED, Event, Lease, LeaseAttrs

EXT = ExternalInterface("eth0", 2, IPv4Address("192.168.77.1"), IPv4Address("192.168.77.1"), 1500)


def _config(**backend) -> NetworkConfig:
    return NetworkConfig.parse({"Network": "10.10.0.0/16", "Backend": {"Type": "udp", **backend}})


def _lease(subnet: str, ip: str, btype: str = "") -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(ip), backend_type=btype))


def test_defaults_port_mtu_and_go_compatible_attrs():
    backend = UdpBackend(EXT, NetworkConfig.parse({"Network": "10.10.0.0/16"}))
    assert backend.port == DEFAULT_PORT == 8285
    assert backend.mtu == 1472
    assert backend.lease_attrs().to_json() == '{"PublicIP":"192.168.77.1"}'


@pytest.mark.parametrize("port", [8300, 1, 65535])
def test_port_option_is_read_case_insensitively(port):
    assert UdpBackend(EXT, _config(port=port)).port == port


@pytest.mark.parametrize("port", [0, 65536, -1, "8285", 8285.0, True, None])
def test_bad_port_is_refused_naming_the_option(port):
    with pytest.raises(ConfigError, match="Port must be an integer from 1 to 65535"):
        UdpBackend(EXT, _config(Port=port))


class RecordingProxy:
    def __init__(self):
        self.routes: dict = {}

    def set_route(self, subnet, ip, port):
        self.routes[subnet] = (ip, port)

    def del_route(self, subnet):
        return self.routes.pop(subnet, None) is not None


def test_apply_maps_events_to_routes_and_skips_our_own_subnet():
    backend = UdpBackend(EXT, _config(Port=8300))
    backend.lease = _lease("10.10.1.0/24", "192.168.77.1")
    backend._proxy = proxy = RecordingProxy()
    backend.apply([
        Event(ADDED, _lease("10.10.1.0/24", "192.168.77.1")),  # our own: never routed
        Event(ADDED, _lease("10.10.2.0/24", "192.168.77.2")),
        Event(ADDED, _lease("10.10.3.0/24", "192.168.77.3", "udp")),
        Event(ADDED, _lease("10.10.4.0/24", "192.168.77.4", "vxlan")),  # not ours to route
    ])
    assert proxy.routes == {
        IPv4Network("10.10.2.0/24"): (IPv4Address("192.168.77.2"), 8300),
        IPv4Network("10.10.3.0/24"): (IPv4Address("192.168.77.3"), 8300),
    }
    backend.apply([Event.removed(IPv4Network("10.10.2.0/24")),
                   Event.removed(IPv4Network("10.10.1.0/24")),
                   Event.removed(IPv4Network("10.10.9.0/24"))])
    assert list(proxy.routes) == [IPv4Network("10.10.3.0/24")]
    # a resync replays the same additions: idempotent
    backend.apply([Event(ADDED, _lease("10.10.3.0/24", "192.168.77.9"))])
    assert proxy.routes[IPv4Network("10.10.3.0/24")] == (IPv4Address("192.168.77.9"), 8300)


def test_apply_skips_our_public_ip_and_drops_peers_that_change_backend():
    backend = UdpBackend(EXT, _config())
    backend.lease = _lease("10.10.1.0/24", "192.168.77.1")
    backend._proxy = proxy = RecordingProxy()
    backend.apply([
        Event(ADDED, _lease("10.10.9.0/24", "192.168.77.1")),  # another lease of ours: would loop
        Event(ADDED, _lease("10.10.2.0/24", "192.168.77.2")),
    ])
    assert list(proxy.routes) == [IPv4Network("10.10.2.0/24")]
    # the peer restarts with the vxlan backend: its udp route goes (ICMP unreachable, not a black hole)
    backend.apply([Event(ADDED, _lease("10.10.2.0/24", "192.168.77.2", "vxlan"))])
    assert proxy.routes == {}


def test_apply_before_start_is_an_error():
    with pytest.raises(BackendError, match="before start"):
        UdpBackend(EXT, _config()).apply([])
