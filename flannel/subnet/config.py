"""The network config (etcd key `<prefix>[/<network>]/config`): defaults and validation.

`NetworkConfig.parse` accepts what Go flanneld accepts (field names in any case) and refuses
everything else with a ConfigError that names the field and the rule it broke.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Iterator, Optional

from flannel.errors import ConfigError
from flannel.subnet.models import get_field, loads

# The backends this daemon implements; flannel.backend's registry is checked against it.
BACKEND_TYPES = ("udp", "vxlan", "host-gw", "alloc")
DEFAULT_BACKEND = "udp"
MAX_SUBNET_LEN = 30


@dataclass(frozen=True)
class NetworkConfig:
    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend_type: str = DEFAULT_BACKEND
    backend: Optional[dict] = field(default=None, compare=True, hash=False)

    # -- decoding -------------------------------------------------------------

    @classmethod
    def parse(cls, text: Any) -> "NetworkConfig":
        """JSON text (or an already decoded dict) -> validated config with defaults filled in."""
        doc = _decode(text)
        folded: dict = {}
        for key, value in doc.items():
            folded.setdefault(key.lower(), value)

        network = _network(folded.get("network"))
        subnet_len = _subnet_len(folded.get("subnetlen"), network)
        size = 1 << (32 - subnet_len)
        first = int(network.network_address)
        last = int(network.broadcast_address) + 1
        smin = _bound(folded, "SubnetMin", network, subnet_len, default=first + size)
        smax = _bound(folded, "SubnetMax", network, subnet_len, default=last - size)
        if int(smin) > int(smax):
            if "subnetmin" in folded or "subnetmax" in folded:
                raise ConfigError(f"SubnetMin {smin} is greater than SubnetMax {smax}")
            raise ConfigError(
                f"SubnetLen {subnet_len} leaves no usable subnet in Network {network} "
                f"(the first subnet is never handed out; use at most /{network.prefixlen + 2})"
            )
        backend, btype = _backend(folded.get("backend"))
        return cls(network, subnet_len, smin, smax, btype, backend)

    # -- encoding -------------------------------------------------------------

    def to_dict(self) -> dict:
        """As Go's server returns it from GET /v1/{network}/config (defaults filled in)."""
        out: dict = {
            "Network": str(self.network),
            "SubnetMin": str(self.subnet_min),
            "SubnetMax": str(self.subnet_max),
            "SubnetLen": self.subnet_len,
        }
        if self.backend is not None:
            out["Backend"] = self.backend
        return out

    # -- queries --------------------------------------------------------------

    def in_range(self, subnet: IPv4Network) -> bool:
        """True when `subnet` is one this config could hand out."""
        return (
            subnet.prefixlen == self.subnet_len
            and int(self.subnet_min) <= int(subnet.network_address) <= int(self.subnet_max)
        )

    def subnets(self) -> Iterator[IPv4Network]:
        """Every subnet in [SubnetMin, SubnetMax], in order."""
        size = 1 << (32 - self.subnet_len)
        for start in range(int(self.subnet_min), int(self.subnet_max) + 1, size):
            yield IPv4Network((start, self.subnet_len))

    def backend_option(self, name: str, default: Any = None) -> Any:
        """A Backend option by name, matched case-insensitively as Go's JSON decoder does."""
        return get_field(self.backend or {}, name, default)


def _decode(text: Any) -> dict:
    if isinstance(text, (bytes, str)):
        try:
            text = loads(text)
        except ValueError as exc:
            raise ConfigError(f"network config is not valid JSON: {exc}") from None
    if not isinstance(text, dict):
        raise ConfigError("network config must be a JSON object")
    return text


def _network(value: Any) -> IPv4Network:
    if value is None or value == "":
        raise ConfigError("Network is missing: the config must name the overlay, e.g. 10.1.0.0/16")
    if not isinstance(value, str):
        raise ConfigError(f"Network must be a string like 10.1.0.0/16, got {value!r}")
    if ":" in value:
        raise ConfigError(f"Network {value!r} is IPv6: only IPv4 overlays are supported")
    try:
        # Go accepts host bits in the CIDR and masks them off; so do we
        return IPv4Network(value, strict=False)
    except ValueError:
        raise ConfigError(f"Network {value!r} is not a valid IPv4 CIDR") from None


def _subnet_len(value: Any, network: IPv4Network) -> int:
    prefix = network.prefixlen
    if value is None or value == 0:
        length = 24 if prefix < 23 else prefix + 2
        if length > MAX_SUBNET_LEN:
            raise ConfigError(
                f"Network {network} is too small: it must be a /28 or larger to hold subnets"
            )
        return length
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"SubnetLen must be an integer, got {value!r}")
    if value > MAX_SUBNET_LEN:
        raise ConfigError(f"SubnetLen {value} is too long: it must be at most {MAX_SUBNET_LEN}")
    if value < prefix:
        raise ConfigError(
            f"SubnetLen {value} is shorter than the Network prefix /{prefix}: "
            "a subnet cannot be larger than the network"
        )
    return value


def _bound(folded: dict, name: str, network: IPv4Network, subnet_len: int, default: int) -> IPv4Address:
    value = folded.get(name.lower())
    if value is None or value == "" or value == "0.0.0.0":
        return IPv4Address(default)
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be an IPv4 address string, got {value!r}")
    try:
        addr = IPv4Address(value)
    except ValueError:
        raise ConfigError(f"{name} {value!r} is not a valid IPv4 address") from None
    if addr not in network:
        raise ConfigError(f"{name} {addr} is not in the range of the Network {network}")
    if int(addr) % (1 << (32 - subnet_len)):
        raise ConfigError(f"{name} {addr} is not on a SubnetLen (/{subnet_len}) boundary")
    return addr


def _backend(value: Any) -> tuple:
    if value is None:
        return None, DEFAULT_BACKEND
    if not isinstance(value, dict):
        raise ConfigError(f"Backend must be a JSON object like {{\"Type\": \"vxlan\"}}, got {value!r}")
    btype = DEFAULT_BACKEND
    for key, val in value.items():
        if key.lower() == "type":
            btype = val
            break
    if not isinstance(btype, str) or btype not in BACKEND_TYPES:
        raise ConfigError(
            f"Backend Type {btype!r} is unknown: expected one of {', '.join(BACKEND_TYPES)}"
        )
    return value, btype
