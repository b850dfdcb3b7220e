"""The host-gw backend: plain kernel routes, for hosts that share one L2 segment.

Per peer: a route to its subnet via its PublicIP on the external interface. Nothing else is
created, so the MTU is the external one. A sync removes such routes of peers that are gone.
Routes vanish when the link goes down or someone deletes them; a named thread, woken by the
kernel's notifications about the external interface (peers.Rechecker), restores them.
Behind NAT (--public-ip differing from the interface address) peers could not route to us,
so the backend refuses to start, as Go flanneld does.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterable

from flannel.backend.base import Backend, ExternalInterface
from flannel.backend.peers import (
    Rechecker, current_peers, split_batch, stale_routes, sweep_other_backends,
)
from flannel.dataplane import netlink
from flannel.dataplane.nlevents import ChangeMonitor
from flannel.errors import BackendError
from flannel.subnet.config import NetworkConfig
from flannel.subnet.models import Event, Lease

log = logging.getLogger(__name__)

CHECK_INTERVAL = 3.0  # seconds: at most one re-check this often; a lost route is back within it


class HostGwBackend(Backend):
    type_name = "host-gw"

    def __init__(self, ext_iface: ExternalInterface, config: NetworkConfig):
        super().__init__(ext_iface, config)
        if ext_iface.ext_addr != ext_iface.iface_addr:
            raise BackendError(
                f"host-gw cannot run behind NAT: the public IP {ext_iface.ext_addr} differs from "
                f"the address {ext_iface.iface_addr} of {ext_iface.name} (peers route to us directly)"
            )
        self._routes: dict = {}  # peer subnet -> its PublicIP (the gateway)
        self._lock = threading.Lock()
        self._recheck = Rechecker(f"hostgw-routes-{ext_iface.name}", "host-gw route(s)",
                                  self.restore_routes, CHECK_INTERVAL,
                                  lambda: ChangeMonitor({ext_iface.index}))

    @property
    def mtu(self) -> int:
        return self.ext_iface.mtu

    def start(self, lease: Lease, stop: threading.Event) -> None:
        self.lease = lease
        # ours are the routes via the external interface (a sync sweeps departed peers' ones)
        sweep_other_backends(self.type_name, self.config, lease.subnet, {self.ext_iface.index})
        self._recheck.start(stop)  # a new lease for a running backend: routes of peers stay valid

    def apply(self, events: Iterable[Event]) -> None:
        own = self.lease.subnet if self.lease else None
        removed, added = split_batch(events, own, self.type_name, self.ext_iface.ext_addr)
        if not removed and not added:
            return
        errors = []
        index = self.ext_iface.index
        with self._lock:
            state = netlink.read_state()  # one dump per batch, not one per peer
            for subnet in removed:
                self._routes.pop(subnet, None)
                if netlink.remove_route(subnet, index, state=state):
                    log.info("peer %s removed", subnet)
            for lease in added:
                self._routes[lease.subnet] = lease.attrs.public_ip
                try:
                    netlink.ensure_route(lease.subnet, index, lease.attrs.public_ip, state=state)
                except BackendError as exc:
                    # the check loop retries it; report it once here
                    log.error("failed to add route for peer %s: %s", lease.subnet, exc)
                    errors.append(exc)
        if errors:
            raise errors[0]

    def sync(self, leases: list[Lease]) -> None:
        """Forget peers not in `leases` and delete the routes a departed peer left on the
        external interface: via a gateway, to a SubnetLen subnet of the overlay Network that
        is neither a current peer's nor ours (one dump for all of them)."""
        own = self.lease.subnet if self.lease else None
        peers = current_peers(leases, own, self.type_name, self.ext_iface.ext_addr)
        errors, swept = [], 0
        with self._lock:
            for subnet in [s for s in self._routes if s not in peers]:
                del self._routes[subnet]  # or the check loop would bring its route back
            state = netlink.read_state()
            for route in stale_routes(state, self.ext_iface.index, self.config, {*peers, own}):
                try:
                    swept += netlink.remove_route(route.dst, route.oif, route.gateway, state=state)
                except BackendError as exc:
                    log.error("failed to remove the route of a departed peer: %s", exc)
                    errors.append(exc)
        if swept:
            log.info("removed %d route(s) of peers that are gone", swept)
        if errors:
            raise errors[0]

    def stop(self) -> None:
        # only the thread ends: our routes stay, so peers keep working across a restart
        self._recheck.halt()

    # -- route restoration (every CHECK_INTERVAL seconds, in the re-check thread) ----

    def restore_routes(self) -> int:
        """Re-add every peer route that is missing or differs; returns how many were fixed."""
        with self._lock:
            state = netlink.read_state()
            fixed, errors = 0, []
            for subnet, gateway in self._routes.items():
                try:
                    fixed += netlink.ensure_route(subnet, self.ext_iface.index, gateway, state=state)
                except BackendError as exc:
                    errors.append(exc)  # keep restoring the others
        if errors:
            raise errors[0]
        return fixed
