"""The etcd key schema of flannel (v2 keys API), as pure functions.

    <prefix>/config                          single-network config
    <prefix>/subnets/<a.b.c.d>-<len>         a lease or reservation
    <prefix>/<network>/config                multi-network mode
    <prefix>/<network>/subnets/<a.b.c.d>-<len>
"""

from __future__ import annotations

import re
from ipaddress import IPv4Network
from typing import Optional

DEFAULT_PREFIX = "/coreos.com/network"
_SUBNET_KEY = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3})-(\d{1,2})$")
_NETWORK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def normalize_prefix(prefix: str) -> str:
    """'/coreos.com/network/' and 'coreos.com/network' -> '/coreos.com/network'."""
    return "/" + prefix.strip("/")


def network_dir(prefix: str, network: str) -> str:
    prefix = normalize_prefix(prefix)
    return f"{prefix}/{network}" if network else prefix


def config_key(prefix: str, network: str = "") -> str:
    return network_dir(prefix, network) + "/config"


def subnets_dir(prefix: str, network: str = "") -> str:
    return network_dir(prefix, network) + "/subnets"


def subnet_to_key(subnet: IPv4Network) -> str:
    """IPv4Network('10.1.34.0/24') -> '10.1.34.0-24' (the last path element of a lease key)."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def key_to_subnet(name: str) -> Optional[IPv4Network]:
    """'10.1.34.0-24' or a full key ending in it -> IPv4Network; None if it is not a subnet key."""
    m = _SUBNET_KEY.match(name.rsplit("/", 1)[-1])
    if not m:
        return None
    try:
        return IPv4Network(f"{m.group(1)}/{m.group(2)}", strict=True)
    except ValueError:
        return None


def subnet_key(prefix: str, network: str, subnet: IPv4Network) -> str:
    return subnets_dir(prefix, network) + "/" + subnet_to_key(subnet)


def is_valid_network_name(name: str) -> bool:
    """A name usable as one path element under the prefix ('_' is the API's default network)."""
    return bool(_NETWORK_NAME.match(name)) and name not in ("config", "subnets", "_")


def network_of_config_key(prefix: str, key: str) -> Optional[str]:
    """'<prefix>/<net>/config' -> '<net>'; None for any other key."""
    head = normalize_prefix(prefix) + "/"
    if not key.startswith(head) or not key.endswith("/config"):
        return None
    name = key[len(head) : -len("/config")]
    return name if name and "/" not in name and is_valid_network_name(name) else None
