"""SubnetManager: the one contract that LocalManager (etcd) and RemoteManager (HTTP) both meet.

It mirrors Go flanneld's subnet.Manager. `network` is a network name, or "" for the default
network (single-network mode). Watches take an opaque `cursor` (None: start with a snapshot)
and a `timeout` in seconds after which an empty result with the same cursor is returned, so
that callers can notice a stop request; they raise RegistryError when the store is unreachable.
(RemoteManager in front of a Go server cannot keep to the timeout: see flannel.remote.client.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from ipaddress import IPv4Address, IPv4Network
from typing import List, Optional

from flannel.subnet.config import NetworkConfig
from flannel.subnet.models import Lease, LeaseAttrs, Reservation, WatchResult

LEASE_TTL_SECONDS = 24 * 3600


class SubnetManager(ABC):
    @abstractmethod
    def get_network_config(self, network: str) -> NetworkConfig:
        """Raises ConfigError (bad or missing config), NotFoundError, RegistryError."""

    @abstractmethod
    def acquire_lease(
        self, network: str, attrs: LeaseAttrs, prefer: Optional[IPv4Network] = None
    ) -> Lease:
        """Reuse our lease (matched by PublicIP) or allocate a free subnet, trying `prefer`
        first when it is in range and free (a subnet from an existing subnet file, or one just
        lost). Raises LeaseError when out of subnets, RegistryError when the store fails."""

    @abstractmethod
    def renew_lease(self, network: str, lease: Lease) -> Lease:
        """Extend the TTL; the returned lease has the new expiration. A reservation stays
        TTL-less. Raises NotFoundError when the lease is gone, LeaseTakenError when another
        host holds the subnet now."""

    @abstractmethod
    def revoke_lease(
        self, network: str, subnet: IPv4Network, holder: Optional[IPv4Address] = None
    ) -> None:
        """Delete the lease of `subnet`. With `holder`, delete it only while that PublicIP
        holds it (compare-and-delete; LeaseTakenError otherwise), so a check of the holder
        and the delete cannot be separated by another host's write."""

    @abstractmethod
    def watch_lease(
        self, network: str, subnet: IPv4Network, cursor: Optional[str], timeout: float
    ) -> WatchResult:
        """Changes of one lease."""

    @abstractmethod
    def watch_leases(self, network: str, cursor: Optional[str], timeout: float) -> WatchResult:
        """Changes of every lease of `network`."""

    @abstractmethod
    def watch_networks(self, cursor: Optional[str], timeout: float) -> WatchResult:
        """Networks appearing (`added`) and disappearing (`removed`) under the prefix, as
        Events with `network` set; a snapshot is a tuple of network names."""

    @abstractmethod
    def add_reservation(self, network: str, reservation: Reservation) -> None:
        """Pin a subnet to a PublicIP (a subnet key without TTL)."""

    @abstractmethod
    def remove_reservation(
        self, network: str, subnet: IPv4Network, holder: Optional[IPv4Address] = None
    ) -> None:
        """Turn a reservation back into a lease, as Go does: the key keeps its value and gets
        the lease TTL again, so its host keeps the subnet until it stops renewing. A lease with a
        TTL is not a reservation (NotFoundError) and is left alone. With `holder`, only while
        the reservation is that PublicIP's (LeaseTakenError)."""

    @abstractmethod
    def list_reservations(self, network: str) -> List[Reservation]:
        """Every TTL-less subnet key of `network`."""

    def close(self) -> None:
        """Release connections; the default has none."""
