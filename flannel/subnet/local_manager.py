"""LocalManager: the lease policy of flanneld on top of etcd (Go flannel's local_manager).

Acquire: reuse the lease whose PublicIP is ours if the config still allows it (else delete
it), then the preferred subnet, then a random one among the first free ones (free: it
overlaps no lease or reservation, whatever their prefix length); every write is
a compare-and-swap (on the key's modifiedIndex, so that a TTL change counts too) and a lost
race is retried. Renew: compare-and-swap on what was read, rewriting the value byte-for-byte unless the attributes changed on purpose; reservations (keys
without TTL) never get one; removing a reservation puts the lease TTL back on the same
value, as Go does. Watches turn etcd indexes into opaque cursors.
"""

from __future__ import annotations

import logging
import random
from bisect import bisect_right
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable, List, Optional

from flannel.errors import LeaseError, LeaseTakenError, NotFoundError
from flannel.subnet.config import NetworkConfig
from flannel.subnet.etcd_registry import CompareFailed, EtcdRegistry, RawLease, SnapshotNeeded, error_index
from flannel.subnet.manager import LEASE_TTL_SECONDS, SubnetManager
from flannel.subnet.models import Lease, LeaseAttrs, Reservation, WatchResult

log = logging.getLogger(__name__)

ACQUIRE_TRIES = 10
RENEW_TRIES = 5
RESERVATION_TRIES = 10  # Go's raceRetries
FREE_CHOICES = 100


class TakenSubnets:
    """The subnets held by leases and reservations, asked whether a candidate of SubnetLen
    overlaps any of them (Go skips every candidate that does, whatever the lease's length).

    A lease of SubnetLen or longer lies inside exactly one candidate, so a set of those
    candidates answers for it in one lookup. A shorter lease (left from an earlier, smaller
    SubnetLen, or a host with another config) covers whole candidates: those are rare, kept
    as merged address ranges and searched by bisection.
    """

    def __init__(self, subnet_len: int, subnets: Iterable[IPv4Network]):
        align = ~((1 << (32 - subnet_len)) - 1)
        self._blocked: set = set()  # first addresses of the candidates that hold a lease
        wide: List[tuple] = []
        for subnet in subnets:
            first = int(subnet.network_address)
            if subnet.prefixlen >= subnet_len:
                self._blocked.add(first & align)
            else:
                wide.append((first, int(subnet.broadcast_address)))
        self._firsts, self._lasts = _merge_ranges(wide)

    def overlaps(self, candidate: IPv4Network) -> bool:
        """`candidate` must be SubnetLen long and aligned (as every candidate is)."""
        first = int(candidate.network_address)
        if first in self._blocked:
            return True
        # an aligned candidate is either inside a shorter lease or apart from it
        i = bisect_right(self._firsts, first) - 1
        return i >= 0 and self._lasts[i] >= first


def _merge_ranges(ranges: List[tuple]) -> tuple:
    """Address ranges -> (firsts, lasts) of disjoint ranges in order: nested leases merged,
    so that the range just before an address is the only one that can contain it."""
    firsts: List[int] = []
    lasts: List[int] = []
    for first, last in sorted(ranges):
        if lasts and first <= lasts[-1]:
            lasts[-1] = max(lasts[-1], last)
        else:
            firsts.append(first)
            lasts.append(last)
    return firsts, lasts


def choose_subnet(
    config: NetworkConfig,
    taken: Iterable[IPv4Network],
    prefer: Optional[IPv4Network] = None,
    rng: random.Random = random._inst,  # type: ignore[attr-defined]
) -> Optional[IPv4Network]:
    """`prefer` if it is in range and overlaps no taken subnet, else a random pick among the
    first FREE_CHOICES such subnets of [SubnetMin, SubnetMax] (random, so that hosts starting
    together rarely race for the same key); None when every subnet is taken."""
    used = TakenSubnets(config.subnet_len, taken)
    if prefer is not None and config.in_range(prefer) and not used.overlaps(prefer):
        return prefer
    free: List[IPv4Network] = []
    for subnet in config.subnets():
        if not used.overlaps(subnet):
            free.append(subnet)
            if len(free) == FREE_CHOICES:
                break
    return rng.choice(free) if free else None


def _value_for(raw: RawLease, attrs: LeaseAttrs) -> str:
    """The stored text when the attributes did not change (keeps fields and bytes Go wrote
    that we do not interpret), else the new attributes."""
    if raw.lease.attrs == attrs and (not attrs.extra or attrs.extra == raw.lease.attrs.extra):
        return raw.value
    return attrs.to_json()


def _parse_cursor(cursor: Optional[str]) -> Optional[int]:
    """A cursor is the text of an etcd index; anything else means 'start with a snapshot'."""
    try:
        return int(cursor) if cursor is not None else None
    except ValueError:
        log.warning("ignoring invalid watch cursor %r: starting with a snapshot", cursor)
        return None


def _net_name(network: str) -> str:
    return network or "(default)"


class LocalManager(SubnetManager):
    def __init__(self, registry: EtcdRegistry, ttl: int = LEASE_TTL_SECONDS, rng: Optional[random.Random] = None):
        self.registry = registry
        self.ttl = ttl
        self._rng = rng or random.Random()

    def get_network_config(self, network: str) -> NetworkConfig:
        return self.registry.get_network_config(network)

    def close(self) -> None:
        self.registry.close()

    # -- acquire ----------------------------------------------------------------------

    def acquire_lease(self, network: str, attrs: LeaseAttrs, prefer: Optional[IPv4Network] = None) -> Lease:
        config = self.get_network_config(network)
        for attempt in range(1, ACQUIRE_TRIES + 1):
            lease = self._try_acquire(network, config, attrs, prefer)
            if lease is not None:
                return lease
            log.debug("lost a race for a subnet of network %s (try %d)", _net_name(network), attempt)
        raise LeaseError(
            f"failed to acquire a lease in network {_net_name(network)}: "
            f"another host won the race for the chosen subnet {ACQUIRE_TRIES} times"
        )

    def _try_acquire(self, network: str, config: NetworkConfig, attrs: LeaseAttrs, prefer) -> Optional[Lease]:
        """One attempt; None when a compare-and-swap lost and the caller should re-read."""
        raws, _ = self.registry.get_subnets(network)
        # reservations first: a host pinned to a subnet gets that one
        own = sorted(
            (r for r in raws if r.lease.attrs.public_ip == attrs.public_ip),
            key=lambda r: (not r.lease.is_reservation, r.lease.subnet != prefer),
        )
        try:
            for i, raw in enumerate(own):
                if config.in_range(raw.lease.subnet):
                    lease = self._reuse(network, raw, attrs)
                    self._drop_other_leases(network, lease.subnet, own[i + 1:])
                    return lease
                log.info(
                    "deleting lease %s of %s: it does not fit the network config any more",
                    raw.lease.subnet, attrs.public_ip,
                )
                self.registry.delete_subnet(network, raw.lease.subnet, prev_index=raw.modified_index)
            # here every lease of ours was deleted (none fits the config): none may block
            # the candidates it overlaps
            taken = [r.lease.subnet for r in raws if r.lease.attrs.public_ip != attrs.public_ip]
            return self._allocate(network, config, attrs, prefer, taken)
        except (CompareFailed, NotFoundError) as exc:
            log.debug("compare-and-swap lost: %s", exc)
            return None

    def _drop_other_leases(self, network: str, kept: IPv4Network, others: List[RawLease]) -> None:
        """One host, one lease: the other leases with our PublicIP (the one we held before a
        reservation moved us, say) would stay routed to us for a day and come back as "ours"
        when the kept one is lost. Reservations stay: they are the administrator's word."""
        for raw in others:
            if raw.lease.is_reservation:
                continue
            try:
                self.registry.delete_subnet(network, raw.lease.subnet, prev_index=raw.modified_index)
            except (CompareFailed, NotFoundError):
                continue  # changed or gone meanwhile: not ours to decide any more
            log.info("deleted lease %s of network %s: this host holds %s now", raw.lease.subnet,
                     _net_name(network), kept)

    def _reuse(self, network: str, raw: RawLease, attrs: LeaseAttrs) -> Lease:
        ttl = None if raw.lease.is_reservation else self.ttl
        written = self.registry.update_subnet(
            network, raw.lease.subnet, _value_for(raw, attrs), ttl, prev_index=raw.modified_index
        )
        kind = "reservation" if ttl is None else "lease"
        log.info("reusing %s %s of network %s", kind, raw.lease.subnet, _net_name(network))
        return written.lease

    def _allocate(self, network, config, attrs, prefer, taken) -> Lease:
        subnet = choose_subnet(config, taken, prefer, self._rng)
        if subnet is None:
            raise LeaseError(
                f"failed to acquire a lease in network {_net_name(network)}: out of subnets "
                f"(every /{config.subnet_len} of {config.network} between SubnetMin "
                f"{config.subnet_min} and SubnetMax {config.subnet_max} is taken)"
            )
        written = self.registry.create_subnet(network, subnet, attrs.to_json(), self.ttl)
        log.info("allocated lease %s of network %s", subnet, _net_name(network))
        return written.lease

    # -- renew / revoke -------------------------------------------------------------------

    def renew_lease(self, network: str, lease: Lease) -> Lease:
        for _ in range(RENEW_TRIES):
            raw = self._read_own(network, lease)
            ttl = None if raw.lease.is_reservation else self.ttl
            try:
                written = self.registry.update_subnet(
                    network, lease.subnet, _value_for(raw, lease.attrs), ttl, prev_index=raw.modified_index
                )
            except CompareFailed as exc:
                log.debug("renewal of %s raced with another write: %s", lease.subnet, exc)
                continue
            return written.lease
        raise LeaseError(f"failed to renew lease {lease.subnet}: the key kept changing under us")

    def _read_own(self, network: str, lease: Lease) -> RawLease:
        try:
            raw = self.registry.get_subnet(network, lease.subnet)
        except NotFoundError:
            raise NotFoundError(
                f"lease {lease.subnet} of network {_net_name(network)} no longer exists "
                "(expired or deleted)"
            ) from None
        holder = raw.lease.attrs.public_ip
        if holder != lease.attrs.public_ip:
            raise LeaseTakenError(
                f"lease {lease.subnet} of network {_net_name(network)} is now held by {holder}, "
                f"not by us ({lease.attrs.public_ip})"
            )
        return raw

    def revoke_lease(
        self, network: str, subnet: IPv4Network, holder: Optional[IPv4Address] = None
    ) -> None:
        if holder is None:
            self.registry.delete_subnet(network, subnet)
            return
        for _ in range(RENEW_TRIES):
            raw = self._read_own(network, Lease(subnet, LeaseAttrs(holder)))
            try:
                self.registry.delete_subnet(network, subnet, prev_index=raw.modified_index)
                return
            except CompareFailed as exc:
                log.debug("revocation of %s raced with another write: %s", subnet, exc)
        raise LeaseError(f"failed to revoke lease {subnet}: the key kept changing under us")

    # -- reservations ---------------------------------------------------------------------

    def add_reservation(self, network: str, reservation: Reservation) -> None:
        config = self.get_network_config(network)
        subnet = reservation.subnet
        if not config.in_range(subnet):
            raise LeaseError(
                f"reservation {subnet}: not a /{config.subnet_len} between SubnetMin "
                f"{config.subnet_min} and SubnetMax {config.subnet_max} of {config.network}"
            )
        value = LeaseAttrs(reservation.public_ip).to_json()
        try:
            self.registry.create_subnet(network, subnet, value, None)
            return
        except CompareFailed:
            pass
        # the subnet is leased already: pin it if the holder is the reserving host
        raw = self.registry.get_subnet(network, subnet)
        if raw.lease.attrs.public_ip != reservation.public_ip:
            raise LeaseError(f"reservation {subnet}: the subnet is held by {raw.lease.attrs.public_ip}")
        self.registry.update_subnet(network, subnet, raw.value, None, prev_index=raw.modified_index)

    def remove_reservation(
        self, network: str, subnet: IPv4Network, holder: Optional[IPv4Address] = None
    ) -> None:
        """As Go does: the key stays and gets the lease TTL back, so the host holding the
        subnet keeps it as an ordinary lease (deleting it would make a Go host exit)."""
        for _ in range(RESERVATION_TRIES):
            raw = self._read_reservation(network, subnet, holder)
            try:
                self.registry.update_subnet(
                    network, subnet, raw.value, self.ttl, prev_index=raw.modified_index
                )
                return
            except (CompareFailed, NotFoundError) as exc:
                # the next read says whether it is still a reservation (and whose)
                log.debug("removal of reservation %s raced with another write: %s", subnet, exc)
        raise LeaseError(
            f"failed to remove the reservation of {subnet}: the key kept changing under us"
        )

    def _read_reservation(
        self, network: str, subnet: IPv4Network, holder: Optional[IPv4Address]
    ) -> RawLease:
        try:
            raw = self.registry.get_subnet(network, subnet)
        except NotFoundError:
            raise NotFoundError(f"no reservation for {subnet} in network {_net_name(network)}") from None
        if not raw.lease.is_reservation:
            raise NotFoundError(f"{subnet} in network {_net_name(network)} is a lease, not a reservation")
        if holder is not None and raw.lease.attrs.public_ip != holder:
            raise LeaseTakenError(
                f"the reservation of {subnet} in network {_net_name(network)} is now "
                f"{raw.lease.attrs.public_ip}'s, not {holder}'s"
            )
        return raw

    def list_reservations(self, network: str) -> List[Reservation]:
        raws, _ = self.registry.get_subnets(network)
        return [
            Reservation(r.lease.subnet, r.lease.attrs.public_ip) for r in raws if r.lease.is_reservation
        ]

    # -- watches ----------------------------------------------------------------------------

    def watch_leases(self, network: str, cursor: Optional[str], timeout: float) -> WatchResult:
        return self._watch(network, None, cursor, timeout)

    def watch_lease(self, network: str, subnet: IPv4Network, cursor: Optional[str], timeout: float) -> WatchResult:
        return self._watch(network, subnet, cursor, timeout)

    def _watch(self, network: str, subnet: Optional[IPv4Network], cursor, timeout) -> WatchResult:
        after = _parse_cursor(cursor)
        if after is not None:
            try:
                got = self.registry.watch_subnets(network, after, timeout, subnet)
            except SnapshotNeeded as exc:
                log.info("watch of network %s must start over: %s", _net_name(network), exc)
            else:
                if got is None:
                    return WatchResult(cursor=cursor)
                events, index = got
                return WatchResult(events=tuple(events), cursor=str(index))
        return self._lease_snapshot(network, subnet)

    def _lease_snapshot(self, network: str, subnet: Optional[IPv4Network]) -> WatchResult:
        if subnet is None:
            raws, index = self.registry.get_subnets(network)
            return WatchResult(snapshot=tuple(r.lease for r in raws), cursor=str(index))
        try:
            raw = self.registry.get_subnet(network, subnet)
        except NotFoundError as exc:
            return WatchResult(snapshot=(), cursor=str(error_index(exc)))
        return WatchResult(snapshot=(raw.lease,), cursor=str(raw.read_index))

    def watch_networks(self, cursor: Optional[str], timeout: float) -> WatchResult:
        after = _parse_cursor(cursor)
        if after is not None:
            try:
                got = self.registry.watch_networks(after, timeout)
            except SnapshotNeeded as exc:
                log.info("watch of networks must start over: %s", exc)
            else:
                if got is None:
                    return WatchResult(cursor=cursor)
                events, index = got
                return WatchResult(events=tuple(events), cursor=str(index))
        names, index = self.registry.get_networks()
        return WatchResult(snapshot=tuple(names), cursor=str(index))
