"""Plain values describing kernel network state, shared by the netlink adapter and backends.

`KernelState` is one dump of the routes (and of one link's neighbours and forwarding
entries) that a backend compares a whole batch of peers against: with a thousand peers, one
dump per batch instead of one per peer. The netlink adapter keeps it up to date as it
changes the kernel, so it stays valid for the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Optional


@dataclass(frozen=True)
class Route:
    """A unicast route of the main table."""

    dst: IPv4Network
    oif: Optional[int]
    gateway: Optional[IPv4Address]
    onlink: bool = False

    def __str__(self) -> str:
        text = str(self.dst)
        if self.gateway is not None:
            text += f" via {self.gateway}"
        text += f" dev #{self.oif}"
        return text + (" onlink" if self.onlink else "")


@dataclass(frozen=True)
class VxlanSpec:
    """What a VXLAN device must look like for the vxlan backend."""

    name: str
    vni: int
    port: int
    local: IPv4Address
    dev_index: int
    gbp: bool = False


@dataclass
class KernelState:
    """Main-table routes by destination; permanent neighbours {ip: mac} and forwarding
    entries {mac: [dst]} of one link (empty when no link was asked for)."""

    routes: dict = field(default_factory=dict)
    neighbours: dict = field(default_factory=dict)
    fdb: dict = field(default_factory=dict)

    @classmethod
    def of(cls, routes: list, neighbours: dict, fdb: list) -> "KernelState":
        state = cls(neighbours=dict(neighbours))
        for route in routes:
            state.routes.setdefault(route.dst, []).append(route)
        for mac, dst in fdb:
            state.fdb.setdefault(mac, []).append(dst)
        return state

    def routes_to(self, dst: IPv4Network, oif: Optional[int] = None) -> list:
        return [r for r in self.routes.get(dst, ()) if oif is None or r.oif == oif]

    def forget_route(self, route: Route) -> None:
        kept = [r for r in self.routes.get(route.dst, ()) if r != route]
        if kept:
            self.routes[route.dst] = kept
        else:
            self.routes.pop(route.dst, None)

    def forget_fdb(self, mac: str, dst: IPv4Address) -> None:
        kept = [d for d in self.fdb.get(mac, ()) if d != dst]
        if kept:
            self.fdb[mac] = kept
        else:
            self.fdb.pop(mac, None)
