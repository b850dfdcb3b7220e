"""The alloc backend: only the lease, no data path (another tool routes the subnets)."""

from __future__ import annotations

import threading
from typing import Iterable

from flannel.backend.base import Backend
from flannel.subnet.models import Event, Lease


class AllocBackend(Backend):
    type_name = "alloc"

    @property
    def mtu(self) -> int:
        # nothing encapsulates, so the overlay carries full-size packets
        return self.ext_iface.mtu

    def start(self, lease: Lease, stop: threading.Event) -> None:
        self.lease = lease

    def apply(self, events: Iterable[Event]) -> None:
        """Peers need no kernel state with alloc."""
