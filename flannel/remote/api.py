"""The /v1 HTTP API of the client/server mode, shared by the server and the client.

One place holds the routes, the URL segments (`_` is the default network, `10.1.34.0-24` a
subnet), the JSON codec of every body (Go flanneld's field names; compact JSON plus the newline
Go's encoder writes) and the mapping between our error classes and HTTP statuses, so that the
two sides cannot drift apart. Query parameters beyond Go's `next` (`wait`, `prefer`) are ones a
Go server ignores.
"""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any, Optional, Tuple

from werkzeug.routing import Map, Rule

from flannel.errors import (
    ConfigError,
    FlannelError,
    LeaseError,
    LeaseTakenError,
    NotFoundError,
    OptionsError,
    PermissionDenied,
    RegistryError,
    RemoteError,
)
from flannel.subnet import keys
from flannel.subnet.config import NetworkConfig
from flannel.subnet.models import (
    DecodeError, Lease, LeaseAttrs, Reservation, WatchResult, dumps, loads,
)

API_ROOT = "/v1"
DEFAULT_NETWORK = "_"
JSON_TYPE = "application/json; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"
# Names our error class so that the client raises the same class the server caught;
# a Go peer ignores it and goes by the status alone.
ERROR_HEADER = "X-Flannel-Error"
# Set on every answer of our server: it honours `wait`, so a client may end a long poll by
# its own read timeout. A Go server ignores `wait` and keeps an abandoned poll (its goroutine
# and etcd watch) until that key changes, so a client must not give up on its polls.
POLL_BOUND_HEADER = "X-Flannel-Poll-Bound"  # value: the longest a poll with `wait` parks, s
NEXT = "next"      # Go's cursor parameter
WAIT = "wait"      # ours: seconds a long poll may park; its presence also says "I accept
                   # an empty result on time-out" (Go's client does not, see server.py)
PREFER = "prefer"  # ours: subnet key to try first on acquire


# ---------------------------------------------------------------------------
# routes: endpoint name -> (methods, rule)

ROUTES = Map(
    [
        Rule("/v1/", endpoint="networks", methods=["GET"]),
        Rule("/v1/<network>/config", endpoint="config", methods=["GET"]),
        Rule("/v1/<network>/leases", endpoint="leases", methods=["GET", "POST"]),
        Rule("/v1/<network>/leases/<subnet>", endpoint="lease", methods=["GET", "PUT", "DELETE"]),
        Rule("/v1/<network>/reservations", endpoint="reservations", methods=["GET", "POST"]),
        Rule("/v1/<network>/reservations/<subnet>", endpoint="reservation", methods=["DELETE"]),
    ],
    strict_slashes=False,
    merge_slashes=False,
)


def network_segment(network: str) -> str:
    """'' (the default network) -> '_'; other names unchanged."""
    return network or DEFAULT_NETWORK


def parse_network_segment(segment: str) -> str:
    """'_' -> ''; any other segment must be a valid network name (RemoteError otherwise)."""
    if segment == DEFAULT_NETWORK:
        return ""
    if not keys.is_valid_network_name(segment):
        raise RemoteError(
            f"invalid network name {segment!r}: use '_' for the default network or a name "
            "of letters, digits, '_', '.', '-'"
        )
    return segment


def parse_subnet_segment(segment: str) -> IPv4Network:
    """'10.1.34.0-24' -> IPv4Network; RemoteError for anything else."""
    subnet = keys.key_to_subnet(segment) if "/" not in segment else None
    if subnet is None:
        raise RemoteError(f"invalid subnet {segment!r}: expected a key like 10.1.34.0-24")
    return subnet


def path(network: Optional[str], *parts: str) -> str:
    """URL path of a route: path(None) is the networks watch, path("", "leases") ..."""
    if network is None:
        return API_ROOT + "/"
    return "/".join([API_ROOT, network_segment(network), *parts])


def lease_path(network: str, subnet: IPv4Network, what: str = "leases") -> str:
    return path(network, what, keys.subnet_to_key(subnet))


# ---------------------------------------------------------------------------
# bodies


def encode(doc: Any) -> bytes:
    """A response body as Go's json.Encoder writes it (compact, trailing newline)."""
    return (dumps(doc) + "\n").encode()


def _load(body: bytes | str, what: str) -> Any:
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteError(f"{what}: body is not UTF-8") from None
    try:
        return loads(body)
    except ValueError as exc:
        raise RemoteError(f"{what}: invalid JSON: {exc}") from None


def _decoded(decode, body: bytes | str, what: str):
    doc = _load(body, what)
    try:
        return decode(doc)
    except (DecodeError, ValueError, TypeError, AttributeError) as exc:
        raise RemoteError(f"{what}: {exc}") from None


def decode_attrs(body: bytes | str) -> LeaseAttrs:
    return _decoded(LeaseAttrs.from_dict, body, "lease attributes")


def decode_lease(body: bytes | str) -> Lease:
    return _decoded(Lease.from_dict, body, "lease")


def decode_reservation(body: bytes | str) -> Reservation:
    return _decoded(Reservation.from_dict, body, "reservation")


def decode_reservations(body: bytes | str) -> list:
    def each(doc):
        if doc is None:
            return []
        if not isinstance(doc, list):
            raise DecodeError("expected a JSON list")
        return [Reservation.from_dict(item) for item in doc]

    return _decoded(each, body, "reservations")


def decode_config(body: bytes | str) -> NetworkConfig:
    doc = _load(body, "network config")
    return NetworkConfig.parse(doc)  # ConfigError names the field


def decode_watch(body: bytes | str, networks: bool = False) -> WatchResult:
    """A watch answer; `"snapshot":[]` (our server's way to say "nothing is left", where Go
    writes null) becomes an empty snapshot rather than "no snapshot"."""
    decode = _network_name if networks else None

    def each(doc):
        result = WatchResult.from_dict(doc, decode)
        snap = [v for k, v in doc.items() if k.lower() == "snapshot"]
        if result.snapshot is None and snap and snap[0] == []:
            result = WatchResult(events=result.events, snapshot=(), cursor=result.cursor)
        return result

    return _decoded(each, body, "watch result")


def _network_name(item: Any) -> str:
    if not isinstance(item, str):
        raise DecodeError(f"network snapshot: expected a name, got {item!r}")
    return item


def parse_cursor(text: Optional[str]) -> Optional[int]:
    """A cursor is an etcd index as a decimal string; None means 'start with a snapshot'."""
    if text is None:
        return None
    if not text.isdigit() or len(text) > 20:
        raise RemoteError(f"invalid cursor {text!r}: expected the decimal etcd index a watch returned")
    return int(text)


# ---------------------------------------------------------------------------
# errors <-> statuses (most specific class first)

_STATUSES: Tuple[Tuple[type, int], ...] = (
    (PermissionDenied, 403),
    (NotFoundError, 404),
    (LeaseTakenError, 409),
    (LeaseError, 409),
    (ConfigError, 500),
    (RegistryError, 503),
    (RemoteError, 400),
    (OptionsError, 400),
    (FlannelError, 500),
)
_CLASSES = {cls.__name__: cls for cls, _ in _STATUSES}


def status_of(exc: FlannelError) -> int:
    for cls, status in _STATUSES:
        if isinstance(exc, cls):
            return status
    return 500


def error_from_response(status: int, name: Optional[str], message: str, action: str) -> FlannelError:
    """The exception a client raises for a non-200 answer: the class the server named in
    ERROR_HEADER when it is one of ours, else one chosen by status (a Go server names none)."""
    cls = _CLASSES.get(name or "")
    if cls is None:
        if status == 403:
            cls = PermissionDenied
        elif status == 404:
            cls = NotFoundError
        elif status == 409:
            cls = LeaseError
        elif status >= 500:
            cls = RegistryError  # etcd trouble behind the server: retryable
        else:
            cls = RemoteError
    text = " ".join(message.split())[:500] or f"HTTP {status}"
    return cls(f"failed to {action}: server answered {status}: {text}")
