"""Helpers the kernel backends share: reading typed Backend options and turning a batch of
lease events into the peers to remove and the peers to add.

A batch is coalesced per subnet (the last event wins) and removals are applied before
additions, so that a host that moved to a new subnet keeping its VTEP MAC or public IP
does not lose the new entries to the removal of the old ones.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Iterable, Optional

from flannel.errors import ConfigError
from flannel.subnet.config import NetworkConfig
from flannel.subnet.models import ADDED, Event

log = logging.getLogger(__name__)


def int_option(config: NetworkConfig, name: str, default: int, low: int, high: int) -> int:
    """An integer Backend option in [low, high] (Go's JSON decoder takes whole floats too)."""
    value = config.backend_option(name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"Backend option {name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"Backend option {name} must be between {low} and {high}, got {value}")
    return value


def bool_option(config: NetworkConfig, name: str) -> bool:
    value = config.backend_option(name, False)
    if not isinstance(value, bool):
        raise ConfigError(f"Backend option {name} must be true or false, got {value!r}")
    return value


def split_batch(
    events: Iterable[Event],
    own_subnet: Optional[IPv4Network],
    backend_type: str,
    own_ip: Optional[IPv4Address] = None,
) -> tuple:
    """(subnets to remove, leases to add or update) for one batch. Our own subnet never
    appears. Leases of another backend type are skipped with a warning (they cannot be
    reached through this data path, as Go flanneld also decides), and so are other leases
    with our own public IP (a lease we held before, not yet expired): a route via ourselves
    would loop."""
    last: dict = {}
    for event in events:
        if event.lease is None:
            continue
        last[event.lease.subnet] = event
    removed, added = [], []
    for subnet, event in last.items():
        if subnet == own_subnet:
            continue
        if event.type != ADDED:
            removed.append(subnet)
        elif event.lease.attrs.backend_type != backend_type:
            log.warning(
                "ignoring lease %s of %s: its BackendType is %r, not %r",
                subnet, event.lease.attrs.public_ip, event.lease.attrs.backend_type, backend_type,
            )
            removed.append(subnet)
        elif own_ip is not None and event.lease.attrs.public_ip == own_ip:
            log.warning("ignoring lease %s: it has our own public IP %s", subnet, own_ip)
            removed.append(subnet)
        else:
            added.append(event.lease)
    return removed, added


def describe(value: Any) -> str:
    """A short printable form of untrusted lease data for a log line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
