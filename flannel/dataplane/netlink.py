"""The only importer of pyroute2: links, addresses, routes, neighbours and FDB entries.

Every change is an idempotent ensure_*/remove_* function: applying it over a state that
already matches changes nothing and raises nothing, so a restart over an existing set-up is
safe. Failures are raised as BackendError naming the object and the operation.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import socket
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address
from typing import Iterator, Optional

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel.backend.base import ExternalInterface
from flannel.dataplane.kstate import KernelState, Route, VxlanSpec
from flannel.errors import BackendError

log = logging.getLogger(__name__)

_LINK_LOCAL = IPv4Network("169.254.0.0/16")
MAIN_TABLE = 254
RTN_UNICAST = 1
RTNH_F_ONLINK = 4
IFF_UP = 1
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
_VXLAN_NAME = re.compile(r"^flannel\.[0-9]+$")  # the vxlan backend's flannel.<VNI>


@contextlib.contextmanager
def _ipr() -> Iterator[IPRoute]:
    """One netlink session. Whatever escapes it unconverted (a dump refused, ENOBUFS on a
    large table, no socket to be had) becomes a BackendError, so that callers that retry
    or log a backend failure never die of a raw pyroute2 or OS error."""
    try:
        ipr = IPRoute()
    except OSError as exc:
        raise BackendError(f"failed to open a netlink socket: {exc}") from exc
    try:
        yield ipr
    except NetlinkError as exc:
        raise netlink_error("read kernel state over netlink", exc) from exc
    except OSError as exc:
        raise BackendError(f"failed to read kernel state over netlink: {exc}") from exc
    finally:
        ipr.close()


# ---------------------------------------------------------------------------
# external interface discovery


def _ipv4_addrs(ipr: IPRoute, index: int) -> list:
    """(address, prefixlen, peer) of the link's IPv4 addresses, kernel order."""
    out = []
    for msg in ipr.get_addr(family=socket.AF_INET, index=index):
        local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        peer = msg.get_attr("IFA_ADDRESS")
        out.append((IPv4Address(local), msg["prefixlen"], IPv4Address(peer) if peer else None))
    return out


def _usable_addr(addrs: list) -> Optional[IPv4Address]:
    """The first address that is not link-local; a point-to-point peer address never counts."""
    for local, _prefix, _peer in addrs:
        if local not in _LINK_LOCAL:
            return local
    return None


def _default_route_index(ipr: IPRoute) -> Optional[int]:
    # get_attr() rather than get(): Debian 12's pyroute2 0.7 resolves only full NLA names
    for route in ipr.route("dump", family=socket.AF_INET, table=MAIN_TABLE):
        if route["dst_len"] != 0:
            continue
        if route.get_attr("RTA_OIF"):
            return route.get_attr("RTA_OIF")
        for hop in route.get_attr("RTA_MULTIPATH") or ():
            if hop["oif"]:
                return hop["oif"]
    return None


def _index_by_addr(ipr: IPRoute, addr: IPv4Address) -> Optional[int]:
    for msg in ipr.get_addr(family=socket.AF_INET):
        if IPv4Address(msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")) == addr:
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
        name = link.get_attr("IFLA_IFNAME")
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
    mtu = link.get_attr("IFLA_MTU") or 0
    if not mtu:
        raise BackendError(f"interface {name} reports no MTU")
    return ExternalInterface(name=name, index=index, iface_addr=iface_addr, ext_addr=ext_addr, mtu=mtu)


def netlink_error(action: str, exc: NetlinkError) -> BackendError:
    """A BackendError naming the failed operation and the kernel's reason."""
    return BackendError(f"failed to {action}: {exc.args[1] if len(exc.args) > 1 else exc}")


def _nl_call(action: str, fn, *args, **kwargs):
    """Run one pyroute2 call, turning a kernel refusal into a BackendError naming `action`."""
    try:
        return fn(*args, **kwargs)
    except NetlinkError as exc:
        raise netlink_error(action, exc) from exc


def _nl_remove(action: str, fn, *args, **kwargs) -> bool:
    """Run one pyroute2 delete; what is already gone counts as removed by someone else
    (returns False), any other refusal is a BackendError naming `action`."""
    try:
        fn(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL):
            return False
        raise netlink_error(action, exc) from exc
    return True


# ---------------------------------------------------------------------------
# links and addresses


def link_index(name: str) -> Optional[int]:
    """The index of the link called `name`, or None when there is none."""
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _get_link(ipr: IPRoute, index: int):
    try:
        return ipr.get_links(index)[0]
    except NetlinkError as exc:
        raise netlink_error(f"find link #{index}", exc) from exc


def link_mac(index: int) -> str:
    """The link's MAC address as lower-case aa:bb:cc:dd:ee:ff."""
    with _ipr() as ipr:
        return _get_link(ipr, index).get_attr("IFLA_ADDRESS")


def ensure_link_up(index: int, mtu: Optional[int] = None) -> None:
    """Set the link administratively up and, when given, its MTU; no-op when already so."""
    with _ipr() as ipr:
        link = _get_link(ipr, index)
        name = link.get_attr("IFLA_IFNAME")
        if mtu is not None and link.get_attr("IFLA_MTU") != mtu:
            _nl_call(f"set MTU {mtu} on {name}", ipr.link, "set", index=index, mtu=mtu)
            log.info("set MTU of %s to %d", name, mtu)
        if not link["flags"] & IFF_UP:
            _nl_call(f"set {name} up", ipr.link, "set", index=index, state="up")
            log.info("set %s up", name)


def ensure_address(index: int, addr: IPv4Interface, exclusive: bool = True) -> None:
    """Put `addr` on the link; with `exclusive`, remove the link's other IPv4 addresses
    (a lease change must not leave the old address behind)."""
    with _ipr() as ipr:
        present = False
        for local, prefixlen, _peer in _ipv4_addrs(ipr, index):
            if local == addr.ip and prefixlen == addr.network.prefixlen:
                present = True
            elif exclusive:
                _nl_call(
                    f"remove address {local}/{prefixlen} from link #{index}",
                    ipr.addr, "del", index=index, address=str(local), prefixlen=prefixlen,
                )
                log.info("removed stale address %s/%d from link #%d", local, prefixlen, index)
        if not present:
            _nl_call(
                f"add address {addr} to link #{index}",
                ipr.addr, "add", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen,
            )
            log.info("added address %s to link #%d", addr, index)


def connected_networks(index: int) -> list:
    """The IPv4 networks directly attached to the link (its addresses' prefixes)."""
    with _ipr() as ipr:
        return [
            IPv4Interface((local, prefixlen)).network
            for local, prefixlen, _peer in _ipv4_addrs(ipr, index)
        ]


# ---------------------------------------------------------------------------
# routes (main table, IPv4)
#
# Every ensure/remove below takes an optional `state` (a KernelState from read_state): with
# it, no dump is made and the state is updated; without it, the function reads what it needs.


def _route_of(msg) -> Route:
    dst = msg.get_attr("RTA_DST") or "0.0.0.0"
    gw = msg.get_attr("RTA_GATEWAY")
    return Route(
        dst=IPv4Network((dst, msg["dst_len"])),
        oif=msg.get_attr("RTA_OIF"),
        gateway=IPv4Address(gw) if gw else None,
        onlink=bool(msg["flags"] & RTNH_F_ONLINK),
    )


def list_routes(oif: Optional[int] = None, dst: Optional[IPv4Network] = None) -> list:
    """Unicast routes of the main table, optionally only those via link `oif` or to `dst`."""
    with _ipr() as ipr:
        msgs = ipr.route("dump", family=socket.AF_INET, table=MAIN_TABLE)
        routes = [_route_of(m) for m in msgs if m["type"] == RTN_UNICAST]
    return [
        r for r in routes
        if (oif is None or r.oif == oif) and (dst is None or r.dst == dst)
    ]


def read_state(index: Optional[int] = None) -> KernelState:
    """One dump of the main table and, when `index` is given, of that link's permanent
    neighbours and forwarding entries."""
    if index is None:
        return KernelState.of(list_routes(), {}, [])
    return KernelState.of(list_routes(), list_neighbours(index), list_fdb(index))


def ensure_route(
    dst: IPv4Network,
    oif: int,
    gateway: Optional[IPv4Address] = None,
    onlink: bool = False,
    state: Optional[KernelState] = None,
) -> bool:
    """Make the main table route `dst` via `gateway` on link `oif`. A route to `dst` that
    differs is replaced. Returns True when the kernel was changed."""
    want = Route(dst, oif, gateway, onlink)
    current = state.routes_to(dst) if state is not None else list_routes(dst=dst)
    if current == [want]:
        return False
    spec = {"dst": str(dst), "oif": oif, "table": MAIN_TABLE}
    if gateway is not None:
        spec["gateway"] = str(gateway)
    if onlink:
        spec["flags"] = RTNH_F_ONLINK
    with _ipr() as ipr:
        # a route to dst with another metric would survive "replace"; drop those first
        for old in current:
            if old != want:
                _delete_route(ipr, old)
        _nl_call(f"add route {want}", ipr.route, "replace", **spec)
    if state is not None:
        state.routes[dst] = [want]
    log.info("route %s%s", want, " (replaced a stale one)" if current else "")
    return True


def remove_route(
    dst: IPv4Network,
    oif: Optional[int] = None,
    gateway: Optional[IPv4Address] = None,
    state: Optional[KernelState] = None,
) -> bool:
    """Delete the main-table routes to `dst` (only those via `oif`/`gateway` when given).
    Returns True when something was deleted; an absent route is not an error."""
    current = state.routes_to(dst, oif) if state is not None else list_routes(oif=oif, dst=dst)
    removed = False
    with _ipr() as ipr:
        for old in current:
            if gateway is not None and old.gateway != gateway:
                continue
            removed |= _delete_route(ipr, old)
            if state is not None:
                state.forget_route(old)
    return removed


def _delete_route(ipr: IPRoute, route: Route) -> bool:
    spec = {"dst": str(route.dst), "table": MAIN_TABLE}
    if route.oif is not None:
        spec["oif"] = route.oif
    if route.gateway is not None:
        spec["gateway"] = str(route.gateway)
    removed = _nl_remove(f"remove route {route}", ipr.route, "del", **spec)
    if removed:
        log.info("removed route %s", route)
    return removed


# ---------------------------------------------------------------------------
# VXLAN device, neighbours and forwarding entries


def _vxlan_mismatch(link, spec: VxlanSpec) -> Optional[str]:
    """Why an existing link cannot serve as `spec`'s device, or None when it can."""
    if link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "vxlan":
        return "it is not a vxlan device"
    data = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
    have = {
        "VNI": data.get_attr("IFLA_VXLAN_ID"),
        "port": data.get_attr("IFLA_VXLAN_PORT"),
        "local": data.get_attr("IFLA_VXLAN_LOCAL"),
        "dev": data.get_attr("IFLA_VXLAN_LINK"),
        "GBP": data.get_attr("IFLA_VXLAN_GBP") is not None,
        "learning": bool(data.get_attr("IFLA_VXLAN_LEARNING")),
    }
    want = {
        "VNI": spec.vni, "port": spec.port, "local": str(spec.local),
        "dev": spec.dev_index, "GBP": spec.gbp, "learning": False,
    }
    for key, value in want.items():
        if have[key] != value:
            return f"its {key} is {have[key]}, not {value}"
    return None


def ensure_vxlan(spec: VxlanSpec) -> int:
    """Create the VXLAN device, or reuse a compatible existing one (its MAC, which peers
    know from our lease, stays); an incompatible one is replaced. Returns its index."""
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=spec.name)
        if found:
            why = _vxlan_mismatch(_get_link(ipr, found[0]), spec)
            if why is None:
                return found[0]
            log.warning("replacing existing device %s: %s", spec.name, why)
            _nl_call(f"delete incompatible device {spec.name}", ipr.link, "del", index=found[0])
        options = dict(
            ifname=spec.name, kind="vxlan", vxlan_id=spec.vni, vxlan_port=spec.port,
            vxlan_local=str(spec.local), vxlan_link=spec.dev_index, vxlan_learning=0,
        )
        if spec.gbp:
            options["vxlan_gbp"] = True
        _nl_call(f"create vxlan device {spec.name}", ipr.link, "add", **options)
        index = ipr.link_lookup(ifname=spec.name)[0]
    log.info("created vxlan device %s (VNI %d, port %d, local %s)", spec.name, spec.vni, spec.port, spec.local)
    return index


def delete_link(index: int) -> bool:
    """Delete a link; an absent one is not an error. Returns True when one was deleted."""
    with _ipr() as ipr:
        return _nl_remove(f"delete link #{index}", ipr.link, "del", index=index)


def flannel_vxlan_links() -> dict:
    """{index: name} of the vxlan devices named as the vxlan backend names its own
    (flannel.<VNI>), of any network on this host."""
    with _ipr() as ipr:
        links = ipr.get_links()
    found = {}
    for link in links:
        name = link.get_attr("IFLA_IFNAME") or ""
        if _VXLAN_NAME.match(name) and link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "vxlan":
            found[link["index"]] = name
    return found


def list_neighbours(index: int) -> dict:
    """Permanent IPv4 neighbours of the link: {IPv4Address: mac}."""
    with _ipr() as ipr:
        msgs = ipr.get_neighbours(family=socket.AF_INET, ifindex=index)
    return {
        IPv4Address(m.get_attr("NDA_DST")): m.get_attr("NDA_LLADDR")
        for m in msgs
        if m["state"] & NUD_PERMANENT and m["ifindex"] == index
    }


def ensure_neighbour(index: int, ip: IPv4Address, mac: str, state: Optional[KernelState] = None) -> bool:
    """A permanent neighbour entry ip -> mac on the link. Returns True when changed."""
    mac = mac.lower()
    current = state.neighbours if state is not None else list_neighbours(index)
    if current.get(ip) == mac:
        return False
    with _ipr() as ipr:
        _nl_call(
            f"set neighbour {ip} lladdr {mac} on link #{index}", ipr.neigh, "replace",
            ifindex=index, dst=str(ip), lladdr=mac, state=NUD_PERMANENT,
        )
    if state is not None:
        state.neighbours[ip] = mac
    return True


def remove_neighbour(index: int, ip: IPv4Address, state: Optional[KernelState] = None) -> bool:
    if state is not None:
        if state.neighbours.pop(ip, None) is None:
            return False
    with _ipr() as ipr:
        return _nl_remove(
            f"remove neighbour {ip} on link #{index}", ipr.neigh, "del", ifindex=index, dst=str(ip)
        )


def list_fdb(index: int) -> list:
    """Forwarding entries of a VXLAN link that carry a remote: [(mac, IPv4Address)]."""
    with _ipr() as ipr:
        msgs = ipr.fdb("dump", ifindex=index)
    return [
        (m.get_attr("NDA_LLADDR"), IPv4Address(m.get_attr("NDA_DST")))
        for m in msgs
        if m["ifindex"] == index and m.get_attr("NDA_DST")
    ]


def _fdb_dsts(index: int, mac: str, state: Optional[KernelState]) -> list:
    if state is not None:
        return list(state.fdb.get(mac, ()))
    return [dst for emac, dst in list_fdb(index) if emac == mac]


def ensure_fdb(index: int, mac: str, dst: IPv4Address, state: Optional[KernelState] = None) -> bool:
    """Exactly one permanent forwarding entry mac -> dst on the VXLAN link. Returns True when changed."""
    mac = mac.lower()
    current = _fdb_dsts(index, mac, state)
    if current == [dst]:
        return False
    with _ipr() as ipr:
        for old in current:
            if old != dst:
                _delete_fdb(ipr, index, mac, old)
        _nl_call(
            f"set forwarding entry {mac} dst {dst} on link #{index}", ipr.fdb, "replace",
            ifindex=index, lladdr=mac, dst=str(dst), state=NUD_PERMANENT | NUD_NOARP,
            flags=NTF_SELF,
        )
    if state is not None:
        state.fdb[mac] = [dst]
    return True


def remove_fdb(
    index: int, mac: str, dst: Optional[IPv4Address] = None, state: Optional[KernelState] = None
) -> bool:
    """Remove the forwarding entries of `mac` (only the one to `dst` when given)."""
    mac = mac.lower()
    removed = False
    with _ipr() as ipr:
        for edst in _fdb_dsts(index, mac, state):
            if dst is None or edst == dst:
                removed |= _delete_fdb(ipr, index, mac, edst)
                if state is not None:
                    state.forget_fdb(mac, edst)
    return removed


def _delete_fdb(ipr: IPRoute, index: int, mac: str, dst: IPv4Address) -> bool:
    return _nl_remove(
        f"remove forwarding entry {mac} dst {dst} on link #{index}",
        ipr.fdb, "del", ifindex=index, lladdr=mac, dst=str(dst),
    )
