"""The contract every data-path backend meets, and the external interface it runs on.

The network loop (flannel.network) drives a backend through one life cycle per lease:

    backend = cls(ext_iface, config)       # no kernel changes yet
    attrs = backend.lease_attrs()          # set up what the lease must advertise (e.g. VTEP MAC)
    backend.start(lease, stop)             # configure for our lease, drop other backends' peer
                                           # routes (peers.sweep_other_backends); may start threads
    backend.sync(leases)                   # every peer lease of a snapshot: sweep stale entries
    backend.apply(events)                  # peers added/removed (never our own lease)
    backend.stop()                         # stop threads; devices, routes stay (peers keep working)

`apply` receives batches from flannel.subnet.watch.LeaseWatcher; a resync arrives as removals
and additions, so `apply` must be idempotent. Before the batch of each snapshot (the first one,
and one taken when the store's history no longer reaches the watcher's cursor), `sync`
receives every peer lease of it: the kernel may hold entries of peers that left while no
daemon was running, which no removal event will ever name. Errors are raised as BackendError (kernel
trouble) or ConfigError (bad Backend options, detected in the constructor).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Iterable

from flannel.subnet.config import NetworkConfig
from flannel.subnet.models import Event, Lease, LeaseAttrs


@dataclass(frozen=True)
class ExternalInterface:
    """The host interface that carries overlay traffic between hosts."""

    name: str
    index: int
    iface_addr: IPv4Address  # the address on the interface
    ext_addr: IPv4Address  # the address peers reach us at (--public-ip, else iface_addr)
    mtu: int


class Backend(ABC):
    """One backend instance per network."""

    #: the `Backend.Type` this class implements
    type_name: str = ""

    def __init__(self, ext_iface: ExternalInterface, config: NetworkConfig):
        self.ext_iface = ext_iface
        self.config = config
        self.lease: Lease | None = None

    @property
    @abstractmethod
    def mtu(self) -> int:
        """The MTU written to subnet.env as FLANNEL_MTU."""

    def lease_attrs(self) -> LeaseAttrs:
        """The attributes to publish with our lease; backends with BackendData override."""
        return LeaseAttrs(
            public_ip=self.ext_iface.ext_addr,
            backend_type="" if self.type_name in ("udp", "alloc") else self.type_name,
        )

    @abstractmethod
    def start(self, lease: Lease, stop: threading.Event) -> None:
        """Configure the data path for our `lease`. Threads started here stop when `stop` is set."""

    @abstractmethod
    def apply(self, events: Iterable[Event]) -> None:
        """Add or remove peers. Must be idempotent and must ignore our own subnet."""

    def sync(self, leases: list[Lease]) -> None:
        """`leases` are all the peers there are (our own lease excluded): forget, and remove
        from the kernel, what this backend owns for any other subnet. Entries of the peers in
        `leases` stay (`apply` follows with them). Default: nothing to sweep."""

    def stop(self) -> None:
        """Stop threads and release file descriptors; kernel state is left for a restart."""
