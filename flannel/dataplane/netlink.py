"""The only importer of pyroute2: links, addresses, routes, neighbours and FDB entries.

Every change is an idempotent ensure_*/remove_* function: applying it over a state that
already matches changes nothing and raises nothing, so a restart over an existing set-up is
safe. Failures are raised as BackendError naming the object and the operation.
"""

from __future__ import annotations

import logging
import socket
from ipaddress import IPv4Address, IPv4Network, ip_address
from typing import Optional

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel.backend.base import ExternalInterface
from flannel.errors import BackendError

log = logging.getLogger(__name__)

_LINK_LOCAL = IPv4Network("169.254.0.0/16")
MAIN_TABLE = 254


def _ipr() -> IPRoute:
    return IPRoute()


# ---------------------------------------------------------------------------
# external interface discovery


def _ipv4_addrs(ipr: IPRoute, index: int) -> list:
    """(address, prefixlen, peer) of the link's IPv4 addresses, kernel order."""
    out = []
    for msg in ipr.get_addr(family=socket.AF_INET, index=index):
        local = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        peer = msg.get("IFA_ADDRESS")
        out.append((IPv4Address(local), msg["prefixlen"], IPv4Address(peer) if peer else None))
    return out


def _usable_addr(addrs: list) -> Optional[IPv4Address]:
    """The first address that is not link-local; a point-to-point peer address never counts."""
    for local, _prefix, _peer in addrs:
        if local not in _LINK_LOCAL:
            return local
    return None


def _default_route_index(ipr: IPRoute) -> Optional[int]:
    for route in ipr.route("dump", family=socket.AF_INET, table=MAIN_TABLE):
        if route["dst_len"] == 0 and route.get("oif"):
            return route.get("oif")
        for hop in route.get("multipath") or ():
            if route["dst_len"] == 0 and hop.get("oif"):
                return hop.get("oif")
    return None


def _index_by_addr(ipr: IPRoute, addr: IPv4Address) -> Optional[int]:
    for msg in ipr.get_addr(family=socket.AF_INET):
        if IPv4Address(msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")) == addr:
            return msg["index"]
    return None


def lookup_external_interface(iface: Optional[str], public_ip: Optional[str]) -> ExternalInterface:
    """Resolve --iface (a name or an IPv4 address; None: the default route's interface) and
    --public-ip into the interface overlay traffic leaves through."""
    with _ipr() as ipr:
        if iface:
            try:
                addr = ip_address(iface)
            except ValueError:
                addr = None
            if addr is not None:
                if not isinstance(addr, IPv4Address):
                    raise BackendError(f"--iface {iface}: only IPv4 addresses are supported")
                index = _index_by_addr(ipr, addr)
                if index is None:
                    raise BackendError(f"--iface {iface}: no interface has this address")
            else:
                found = ipr.link_lookup(ifname=iface)
                if not found:
                    raise BackendError(f"--iface {iface}: no such interface")
                index = found[0]
        else:
            index = _default_route_index(ipr)
            if index is None:
                raise BackendError(
                    "no default route: name the external interface with --iface"
                )
        link = ipr.get_links(index)[0]
        name = link.get("IFLA_IFNAME")
        addrs = _ipv4_addrs(ipr, index)
    if iface and addr is not None:
        iface_addr = addr
    else:
        iface_addr = _usable_addr(addrs)
    if iface_addr is None:
        raise BackendError(f"interface {name} has no usable IPv4 address (link-local ones do not count)")
    ext_addr = iface_addr
    if public_ip:
        try:
            ext_addr = IPv4Address(public_ip)
        except ValueError:
            raise BackendError(f"--public-ip {public_ip!r} is not an IPv4 address") from None
    mtu = link.get("IFLA_MTU") or 0
    if not mtu:
        raise BackendError(f"interface {name} reports no MTU")
    return ExternalInterface(name=name, index=index, iface_addr=iface_addr, ext_addr=ext_addr, mtu=mtu)


def netlink_error(action: str, exc: NetlinkError) -> BackendError:
    """A BackendError naming the failed operation and the kernel's reason."""
    return BackendError(f"failed to {action}: {exc.args[1] if len(exc.args) > 1 else exc}")
