"""The vxlan backend: the kernel's VXLAN device carries overlay traffic between hosts.

Our side: device `flannel.<VNI>` (local = external address, dev = external interface, no
learning, MTU = external MTU - 50) holding our lease's .0/32; its MAC is published in the
lease as BackendData {"VtepMAC": ...}. Per peer, as later Go flanneld versions do: a
permanent neighbour (peer .0 -> VtepMAC), a permanent forwarding entry (VtepMAC -> peer
PublicIP) and a route to the peer subnet via its .0 onlink. With DirectRouting, a peer on our
L2 segment gets a plain route via its PublicIP instead. Devices and entries outlive stop();
a sync removes those of peers that are gone. A named thread restores the entries of
programmed peers that went missing or changed (someone deleted one; the kernel drops the
routes when the device goes down), woken by the kernel's notifications (peers.Rechecker),
and tries again every CHECK_INTERVAL seconds the peers the kernel refused.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Iterable, Optional

from flannel.backend.base import Backend, ExternalInterface
from flannel.backend.peers import (
    Rechecker, bool_option, current_peers, describe, int_option, peer_subnet_of, split_batch,
    stale_routes, sweep_other_backends,
)
from flannel.dataplane import netlink
from flannel.dataplane.kstate import KernelState, VxlanSpec
from flannel.dataplane.nlevents import ChangeMonitor
from flannel.errors import BackendError
from flannel.subnet.config import NetworkConfig
from flannel.subnet.models import Event, Lease, LeaseAttrs, get_field

log = logging.getLogger(__name__)

DEFAULT_VNI = 1
DEFAULT_PORT = 8472  # the Linux default; Go flanneld's Port 0 means this too
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
CHECK_INTERVAL = 3.0  # seconds: at most one re-check this often, a refused peer retried so often
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class _Peer:
    public_ip: IPv4Address
    mac: str
    direct: bool


class VxlanBackend(Backend):
    type_name = "vxlan"

    def __init__(self, ext_iface: ExternalInterface, config: NetworkConfig):
        super().__init__(ext_iface, config)
        vni = int_option(config, "VNI", DEFAULT_VNI, 0, (1 << 24) - 1)
        port = int_option(config, "Port", DEFAULT_PORT, 0, 65535)
        self.spec = VxlanSpec(
            name=f"flannel.{vni}",
            vni=vni,
            port=port or DEFAULT_PORT,
            local=ext_iface.iface_addr,
            dev_index=ext_iface.index,
            gbp=bool_option(config, "GBP"),
        )
        self.direct_routing = bool_option(config, "DirectRouting")
        self.dev_index: Optional[int] = None
        self.mac: Optional[str] = None
        self._peers: dict = {}  # subnet -> _Peer, what we programmed
        self._failed: dict = {}  # subnet -> Lease the kernel refused, retried by _recheck
        self._lock = threading.Lock()
        self._recheck = Rechecker(f"vxlan-check-{self.spec.name}", "vxlan peer entries",
                                  self.recheck, CHECK_INTERVAL, self._monitor)

    @property
    def mtu(self) -> int:
        return self.ext_iface.mtu - VXLAN_OVERHEAD

    def _ensure_device(self) -> int:
        self.dev_index = netlink.ensure_vxlan(self.spec)
        self.mac = netlink.link_mac(self.dev_index)
        return self.dev_index

    def lease_attrs(self) -> LeaseAttrs:
        # the device must exist now: its MAC goes into the lease peers program
        self._ensure_device()
        return LeaseAttrs(
            public_ip=self.ext_iface.ext_addr,
            backend_type=self.type_name,
            backend_data={"VtepMAC": self.mac},
        )

    def start(self, lease: Lease, stop: threading.Event) -> None:
        with self._lock:
            index = self._ensure_device()
            netlink.ensure_address(index, IPv4Interface((lease.subnet.network_address, 32)))
            netlink.ensure_link_up(index, self.mtu)
            self.lease = lease
            sweep_other_backends(self.type_name, self.config, lease.subnet, self._links())
        self._recheck.start(stop)
        log.info("vxlan device %s ready: MAC %s, MTU %d", self.spec.name, self.mac, self.mtu)

    def apply(self, events: Iterable[Event]) -> None:
        own = self.lease.subnet if self.lease else None
        removed, added = split_batch(events, own, self.type_name, self.ext_iface.ext_addr)
        if not removed and not added:
            return
        errors = []
        with self._lock:
            batch = self._read_batch()
            for subnet in removed:
                self._failed.pop(subnet, None)
                errors += self._try(f"remove peer {subnet}", self._remove_peer, subnet, batch)
            for lease in added:
                failed = self._try(f"add peer {lease.subnet}", self._add_peer, lease, batch)
                if failed:
                    self._failed[lease.subnet] = lease  # the re-check thread tries again
                else:
                    self._failed.pop(lease.subnet, None)
                errors += failed
        if errors:
            raise errors[0]

    def recheck(self) -> int:
        """Restore the missing or changed entries of programmed peers and program again the
        peers the kernel refused (every CHECK_INTERVAL seconds, in the re-check thread; one
        dump); returns how many peers were repaired."""
        with self._lock:
            if not self._peers and not self._failed:
                return 0
            batch, done, errors = self._read_batch(), 0, []
            for subnet, peer in list(self._peers.items()):
                try:
                    done += self._ensure_entries(subnet, peer, batch.state)
                except BackendError as exc:
                    errors.append(BackendError(f"failed to restore peer {subnet}: {exc}"))
            for subnet, lease in list(self._failed.items()):
                try:
                    self._add_peer(lease, batch)
                except BackendError as exc:
                    errors.append(BackendError(f"failed to add peer {subnet}: {exc}"))
                    continue
                del self._failed[subnet]
                done += 1
        if errors:
            raise errors[0]
        return done

    def _links(self) -> list:
        """The links our peer routes are on: our device and, with DirectRouting, the
        external interface."""
        return [self.dev_index] + ([self.ext_iface.index] if self.direct_routing else [])

    def _monitor(self) -> ChangeMonitor:
        """Notifications about our device (and, with DirectRouting, the external interface
        carrying direct routes), for the re-check thread."""
        return ChangeMonitor(set(self._links()), neighbour_links={self.dev_index})

    def stop(self) -> None:
        # only the thread ends: device and entries stay, so peers keep working across a restart
        self._recheck.halt()

    def _read_batch(self) -> "_Batch":
        # one dump for the whole batch (a first snapshot may hold a thousand peers)
        if self.dev_index is None:
            self._ensure_device()
        return _Batch(
            netlink.read_state(self.dev_index),
            netlink.connected_networks(self.ext_iface.index) if self.direct_routing else [],
        )

    def sync(self, leases: list[Lease]) -> None:
        """Forget peers not in `leases` and delete what departed peers left on our device
        (routes via a gateway to SubnetLen subnets of the Network, permanent neighbours at
        such a subnet's first address, forwarding entries of a MAC no current peer has) and,
        with DirectRouting, their direct routes on the external interface. One dump."""
        own = self.lease.subnet if self.lease else None
        peers = current_peers(leases, own, self.type_name, self.ext_iface.ext_addr)
        keep = {*peers, own}
        macs = {_vtep_mac(lease) for lease in peers.values()}
        errors, swept = [], 0
        with self._lock:
            if self.dev_index is None:
                self._ensure_device()
            for known in (self._peers, self._failed):
                for subnet in [s for s in known if s not in peers]:
                    del known[subnet]
            state = netlink.read_state(self.dev_index)
            for action, fn, *args in self._stale(state, keep, macs):
                try:
                    swept += fn(*args, state=state)
                except BackendError as exc:
                    log.error("failed to remove %s of a departed peer: %s", action, exc)
                    errors.append(exc)
        if swept:
            log.info("removed %d entries of peers that are gone from %s", swept, self.spec.name)
        if errors:
            raise errors[0]

    def _stale(self, state: KernelState, keep: set, macs: set) -> list:
        """(what, remove function, its arguments) for every entry a sync removes."""
        links = self._links()
        stale = [
            (f"route {route}", netlink.remove_route, route.dst, route.oif, route.gateway)
            for link in links for route in stale_routes(state, link, self.config, keep)
        ]
        gateways = {subnet.network_address for subnet in keep if subnet is not None}
        for ip in state.neighbours:
            subnet = IPv4Network((ip, self.config.subnet_len), strict=False)
            if ip not in gateways and ip == subnet.network_address and peer_subnet_of(self.config, subnet):
                stale.append((f"neighbour {ip}", netlink.remove_neighbour, self.dev_index, ip))
        for mac, dsts in state.fdb.items():
            if mac not in macs:
                stale += [(f"forwarding entry {mac} dst {dst}", netlink.remove_fdb, self.dev_index, mac, dst)
                          for dst in dsts]
        return stale

    @staticmethod
    def _try(action: str, fn, *args) -> list:
        # one broken peer must not keep the others from being programmed
        try:
            fn(*args)
        except BackendError as exc:
            log.error("failed to %s: %s", action, exc)
            return [BackendError(f"failed to {action}: {exc}")]
        return []

    # -- peers ----------------------------------------------------------------

    def _peer_of(self, lease: Lease, batch: "_Batch") -> Optional[_Peer]:
        mac = _vtep_mac(lease)
        if mac is None:
            log.warning(
                "skipping peer %s (%s): BackendData must hold a VtepMAC like aa:bb:cc:dd:ee:ff, got %s",
                lease.subnet, lease.attrs.public_ip, describe(lease.attrs.backend_data),
            )
            return None
        direct = any(lease.attrs.public_ip in net for net in batch.connected)
        return _Peer(lease.attrs.public_ip, mac, direct)

    def _add_peer(self, lease: Lease, batch: "_Batch") -> None:
        peer = self._peer_of(lease, batch)
        if peer is None:
            return
        subnet, state = lease.subnet, batch.state
        old = self._peers.get(subnet)
        if old is not None and old != peer:
            log.info("peer %s changed from %s to %s", subnet, old, peer)
            if old.direct != peer.direct:
                self._drop_entries(subnet, old, state)
            elif old.mac != peer.mac:
                # the neighbour and route are replaced below; the old MAC's entry is not
                self._drop_fdb(subnet, old.mac, state)
        changed = self._ensure_entries(subnet, peer, state)
        self._peers[subnet] = peer
        if changed:
            log.info("peer %s at %s (VtepMAC %s%s)", subnet, peer.public_ip, peer.mac,
                     ", direct route" if peer.direct else "")

    def _ensure_entries(self, subnet: IPv4Network, peer: _Peer, state: KernelState) -> bool:
        """Make the peer's entries be there as they should; whether anything was changed."""
        gateway = subnet.network_address
        if peer.direct:
            return netlink.ensure_route(subnet, self.ext_iface.index, peer.public_ip, state=state)
        changed = netlink.ensure_neighbour(self.dev_index, gateway, peer.mac, state)
        changed |= netlink.ensure_fdb(self.dev_index, peer.mac, peer.public_ip, state)
        changed |= netlink.ensure_route(subnet, self.dev_index, gateway, onlink=True, state=state)
        return changed

    def _remove_peer(self, subnet: IPv4Network, batch: "_Batch") -> None:
        peer = self._peers.pop(subnet, None)
        known = peer is not None
        if peer is None:
            # not programmed by this process (e.g. before a restart): find what is there
            mac = batch.state.neighbours.get(subnet.network_address)
            known = mac is not None
            peer = _Peer(IPv4Address(0), mac or "", False)
        self._drop_entries(subnet, peer, batch.state)
        # a lease this backend never used (another BackendType, say) was never a peer here
        log.log(logging.INFO if known else logging.DEBUG, "peer %s removed", subnet)

    def _drop_entries(self, subnet: IPv4Network, peer: _Peer, state: KernelState) -> None:
        netlink.remove_route(subnet, self.dev_index, state=state)
        netlink.remove_route(subnet, self.ext_iface.index, state=state)
        netlink.remove_neighbour(self.dev_index, subnet.network_address, state)
        self._drop_fdb(subnet, peer.mac, state)

    def _drop_fdb(self, subnet: IPv4Network, mac: str, state: KernelState) -> None:
        """Remove `mac`'s forwarding entry unless another peer still uses that MAC."""
        in_use = any(p.mac == mac and not p.direct for s, p in self._peers.items() if s != subnet)
        if mac and not in_use:
            netlink.remove_fdb(self.dev_index, mac, state=state)


def _vtep_mac(lease: Lease) -> Optional[str]:
    """The lease's VtepMAC in lower case, or None when its BackendData holds no valid one."""
    data = lease.attrs.backend_data
    # Go decodes BackendData into a struct: "vtepMAC" or "vtepmac" is the same field
    mac = get_field(data, "VtepMAC") if isinstance(data, dict) else None
    return mac.lower() if isinstance(mac, str) and _MAC.match(mac.lower()) else None


@dataclass
class _Batch:
    """What one apply() reads once: the kernel state and (for DirectRouting) our L2 segments."""

    state: KernelState
    connected: list
