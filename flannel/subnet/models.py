"""Frozen value types of the subnet layer and their Go-compatible JSON encoding.

Field names, order and formats match what Go flanneld writes into etcd and sends over its
HTTP API (see PROTOCOL.md), so that a Go host and a Python host can share one etcd and one
server. Decoding is tolerant (any field-name case, unknown fields kept); encoding is exact.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Optional

ADDED = "added"
REMOVED = "removed"
EVENT_TYPES = (ADDED, REMOVED)

ZERO_TIME = "0001-01-01T00:00:00Z"
_RFC3339 = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:\d\d)$"
)


class DecodeError(ValueError):
    """A JSON document does not have the shape Go flanneld gives it."""


# ---------------------------------------------------------------------------
# scalar codecs


def parse_time(text: str) -> Optional[datetime]:
    """RFC 3339 with any number of fraction digits -> aware UTC datetime; Go's zero time -> None."""
    m = _RFC3339.match(text or "")
    if not m:
        raise DecodeError(f"invalid RFC 3339 time {text!r}")
    year, mon, day, hh, mm, ss, frac, tz = m.groups()
    if (year, mon, day) == ("0001", "01", "01") and (hh, mm, ss) == ("00", "00", "00"):
        return None
    micro = int((frac or "0")[:6].ljust(6, "0"))
    tzinfo = timezone.utc
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        tzinfo = timezone(sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))
    dt = datetime(int(year), int(mon), int(day), int(hh), int(mm), int(ss), micro, tzinfo)
    return dt.astimezone(timezone.utc)


def format_time(when: Optional[datetime]) -> str:
    """Aware datetime -> RFC 3339 UTC as Go writes it (fraction trimmed); None -> Go's zero time."""
    if when is None:
        return ZERO_TIME
    when = when.astimezone(timezone.utc)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if when.microsecond:
        text += "." + f"{when.microsecond:06d}".rstrip("0")
    return text + "Z"


def parse_network(text: Any, what: str = "Subnet") -> IPv4Network:
    """"10.1.2.0/24" -> IPv4Network (host bits must be zero)."""
    if not isinstance(text, str):
        raise DecodeError(f"{what}: expected a string like 10.1.2.0/24, got {text!r}")
    try:
        return IPv4Network(text, strict=True)
    except ValueError as exc:
        raise DecodeError(f"{what}: invalid IPv4 network {text!r}: {exc}") from None


def parse_ip(text: Any, what: str = "PublicIP") -> IPv4Address:
    if not isinstance(text, str):
        raise DecodeError(f"{what}: expected an IPv4 address string, got {text!r}")
    try:
        return IPv4Address(text)
    except ValueError:
        raise DecodeError(f"{what}: invalid IPv4 address {text!r}") from None


def dumps(obj: Any) -> str:
    """Compact JSON as Go's encoding/json writes it (no spaces, no ASCII escaping of '<>&' needed).
    NaN and infinities are refused (ValueError): Go could not read them back."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def _integer(text: str) -> int:
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise ValueError(f"number {text[:20]}... is out of range") from None
    return value


def loads(text: str | bytes) -> Any:
    """JSON as Go's encoding/json accepts it: no NaN or Infinity, no number beyond a float64
    (Python's json takes them, and they would reach etcd and Go peers)."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite, parse_int=_integer)
    except RecursionError:  # "[[[[..." nested deeper than the parser's stack: bad input too
        raise ValueError("JSON nested too deeply") from None


def _fold(doc: dict) -> dict:
    """Lower-case keys, for Go's case-insensitive field matching (first spelling wins)."""
    out: dict = {}
    for key, value in doc.items():
        out.setdefault(key.lower(), value)
    return out


def get_field(doc: dict, name: str, default: Any = None) -> Any:
    """`doc[name]` with the name in any case, as Go's decoder fills a struct field (e.g.
    VtepMAC from a peer's BackendData); the first spelling wins, as everywhere here."""
    return _fold(doc).get(name.lower(), default)


def _object(doc: Any, what: str) -> dict:
    if not isinstance(doc, dict):
        raise DecodeError(f"{what}: expected a JSON object, got {type(doc).__name__}")
    return doc


# ---------------------------------------------------------------------------
# value types

_ATTR_FIELDS = ("publicip", "backendtype", "backenddata")


@dataclass(frozen=True)
class LeaseAttrs:
    """What a host publishes with its lease. `extra` keeps fields we do not interpret
    (e.g. newer Go's PublicIPv6) so that a renewal writes them back unchanged."""

    public_ip: IPv4Address
    backend_type: str = ""
    backend_data: Any = None
    extra: tuple = field(default=(), compare=False)

    def to_dict(self) -> dict:
        out: dict = {"PublicIP": str(self.public_ip)}
        extra = dict(self.extra)
        # newer Go writes PublicIPv6 right after PublicIP; keep that place
        if "PublicIPv6" in extra:
            out["PublicIPv6"] = extra.pop("PublicIPv6")
        if self.backend_type:
            out["BackendType"] = self.backend_type
        if self.backend_data is not None:
            out["BackendData"] = self.backend_data
        out.update(extra)
        return out

    def to_json(self) -> str:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, doc: Any) -> "LeaseAttrs":
        doc = _object(doc, "lease attributes")
        folded = _fold(doc)
        if "publicip" not in folded:
            raise DecodeError("lease attributes: PublicIP is missing")
        btype = folded.get("backendtype") or ""
        if not isinstance(btype, str):
            raise DecodeError(f"BackendType: expected a string, got {btype!r}")
        extra = tuple((k, v) for k, v in doc.items() if k.lower() not in _ATTR_FIELDS)
        return cls(
            public_ip=parse_ip(folded["publicip"]),
            backend_type=btype,
            backend_data=folded.get("backenddata"),
            extra=extra,
        )

    @classmethod
    def from_json(cls, text: str) -> "LeaseAttrs":
        return cls.from_dict(_loads(text, "lease attributes"))


@dataclass(frozen=True)
class Lease:
    """A subnet held by a host until `expiration` (None: a reservation, never expires).
    `asof` is the store index the lease was read at (not serialised)."""

    subnet: IPv4Network
    attrs: LeaseAttrs
    expiration: Optional[datetime] = None
    asof: int = field(default=0, compare=False)

    def to_dict(self) -> dict:
        return {
            "Subnet": str(self.subnet),
            "Attrs": self.attrs.to_dict(),
            "Expiration": format_time(self.expiration),
        }

    def to_json(self) -> str:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, doc: Any) -> "Lease":
        folded = _fold(_object(doc, "lease"))
        if "subnet" not in folded:
            raise DecodeError("lease: Subnet is missing")
        exp = folded.get("expiration")
        return cls(
            subnet=parse_network(folded["subnet"]),
            attrs=LeaseAttrs.from_dict(folded.get("attrs", {"PublicIP": "0.0.0.0"})),
            expiration=parse_time(exp) if exp else None,
        )

    @classmethod
    def from_json(cls, text: str) -> "Lease":
        return cls.from_dict(_loads(text, "lease"))

    @property
    def is_reservation(self) -> bool:
        return self.expiration is None


@dataclass(frozen=True)
class Reservation:
    """A subnet pinned to a PublicIP: an etcd subnet key without TTL."""

    subnet: IPv4Network
    public_ip: IPv4Address

    def to_dict(self) -> dict:
        return {"Subnet": str(self.subnet), "PublicIP": str(self.public_ip)}

    @classmethod
    def from_dict(cls, doc: Any) -> "Reservation":
        folded = _fold(_object(doc, "reservation"))
        for name in ("subnet", "publicip"):
            if name not in folded:
                raise DecodeError(f"reservation: {'Subnet' if name == 'subnet' else 'PublicIP'} is missing")
        return cls(parse_network(folded["subnet"]), parse_ip(folded["publicip"]))


@dataclass(frozen=True)
class Event:
    """A change of one lease (or, with `network` set, of one network in multi-network mode)."""

    type: str
    lease: Optional[Lease] = None
    network: str = ""

    def to_dict(self) -> dict:
        out: dict = {"type": self.type}
        if self.lease is not None:
            out["lease"] = self.lease.to_dict()
        if self.network:
            out["network"] = self.network
        return out

    @classmethod
    def from_dict(cls, doc: Any) -> "Event":
        folded = _fold(_object(doc, "event"))
        etype = folded.get("type")
        if etype not in EVENT_TYPES:
            raise DecodeError(f"event: type must be 'added' or 'removed', got {etype!r}")
        lease = folded.get("lease")
        return cls(
            type=etype,
            lease=Lease.from_dict(lease) if lease else None,
            network=folded.get("network") or "",
        )

    @classmethod
    def removed(cls, subnet: IPv4Network) -> "Event":
        """A removal as Go reports it: only the subnet, PublicIP 0.0.0.0, zero expiration."""
        return cls(REMOVED, Lease(subnet, LeaseAttrs(IPv4Address("0.0.0.0"))))


@dataclass(frozen=True)
class WatchResult:
    """One answer of a watch: either `snapshot` (the whole current state) or `events`
    since the cursor that was passed in; `cursor` is opaque text to pass to the next call.
    `snapshot` is None when the result carries events only."""

    events: tuple = ()
    snapshot: Optional[tuple] = None
    cursor: Optional[str] = None

    def to_dict(self) -> dict:
        # Go encodes empty lists as null
        return {
            "events": [e.to_dict() for e in self.events] or None,
            "snapshot": self._snapshot_list(),
            "cursor": self.cursor,
        }

    def _snapshot_list(self):
        if not self.snapshot:
            return None
        return [item.to_dict() if hasattr(item, "to_dict") else item for item in self.snapshot]

    def to_json(self) -> str:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, doc: Any, snapshot_of=None) -> "WatchResult":
        """`snapshot_of`: a decoder for snapshot items (Lease.from_dict by default; for the
        networks watch the items are plain strings)."""
        folded = _fold(_object(doc, "watch result"))
        decode = snapshot_of or Lease.from_dict
        events = tuple(Event.from_dict(e) for e in (folded.get("events") or ()))
        snap = folded.get("snapshot")
        snapshot = tuple(decode(s) for s in snap) if snap else None
        cursor = folded.get("cursor")
        if cursor is not None and not isinstance(cursor, str):
            cursor = str(cursor)
        return cls(events=events, snapshot=snapshot, cursor=cursor)


def _loads(text: Any, what: str) -> Any:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        return loads(text)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"{what}: invalid JSON: {exc}") from None
