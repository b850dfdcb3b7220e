"""The alloc backend: only the lease, no data path (another tool routes the subnets).

At start it removes the routes into flannel.<N> vxlan devices that an earlier vxlan backend
of this network left (they would take the traffic into a device nobody maintains). Routes
via the external interface stay: host-gw's look exactly like those of a routing tool that
works with alloc, and they keep working while the peer is there."""

from __future__ import annotations

import threading
from typing import Iterable

from flannel.backend.base import Backend
from flannel.backend.peers import sweep_other_backends
from flannel.subnet.models import Event, Lease


class AllocBackend(Backend):
    type_name = "alloc"

    @property
    def mtu(self) -> int:
        # nothing encapsulates, so the overlay carries full-size packets
        return self.ext_iface.mtu

    def start(self, lease: Lease, stop: threading.Event) -> None:
        self.lease = lease
        sweep_other_backends(self.type_name, self.config, lease.subnet, vxlan_only=True)

    def apply(self, events: Iterable[Event]) -> None:
        """Peers need no kernel state with alloc."""
