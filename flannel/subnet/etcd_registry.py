"""etcd I/O of the subnet layer (v2 keys API through python-etcd), and nothing else.

Reads are quorum reads, writes are compare-and-swap. Results come back as models plus the
etcd index they were read at. Failures are mapped once into flannel.errors: an unreachable
or failing etcd is a RegistryError ("failed to X: cause"), a missing key a NotFoundError, a
lost compare-and-swap a CompareFailed, and etcd's "event index cleared" answer a
SnapshotNeeded so that the caller re-reads the whole state. Several endpoints may be given:
a connection failure moves on to the next one. The password never reaches a log line.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import List, Optional, Tuple
from urllib.parse import urlsplit

import etcd
import urllib3

from flannel.errors import ConfigError, LeaseError, NotFoundError, RegistryError
from flannel.subnet import keys
from flannel.subnet.config import NetworkConfig
from flannel.subnet.models import ADDED, REMOVED, DecodeError, Event, Lease, LeaseAttrs, parse_time

log = logging.getLogger(__name__)
# python-etcd logs every failed request at ERROR; outages are reported once by our callers
logging.getLogger("etcd.client").setLevel(logging.CRITICAL)

REQUEST_TIMEOUT = 5.0
# while a watch only times out, look this often whether etcd's index went back below the
# cursor (etcd restored from a backup, or wiped): such a watch would wait for an index that
# may not come for days, and our own lease would look untouched meanwhile
INDEX_CHECK = 60.0
_REMOVED_ACTIONS = ("delete", "expire", "compareAndDelete")


class CompareFailed(LeaseError):
    """A compare-and-swap lost: the key changed (or appeared) since it was read."""


class SnapshotNeeded(Exception):
    """The watch cannot continue from its index (etcd cleared that part of its history, or a
    whole directory went away): the caller must take a fresh snapshot."""


@dataclass(frozen=True)
class RawLease:
    """A lease key as stored: the decoded lease plus the exact value text, for byte-exact
    compare-and-swap renewals."""

    lease: Lease
    value: str
    modified_index: int
    read_index: int = 0  # the etcd index of the read that returned it (0 after a write)


class EtcdRegistry:
    def __init__(
        self,
        endpoints: List[str],
        prefix: str = keys.DEFAULT_PREFIX,
        *,
        keyfile: Optional[str] = None,
        certfile: Optional[str] = None,
        cafile: Optional[str] = None,
        username: Optional[str] = None,
        password: Optional[str] = None,
        timeout: float = REQUEST_TIMEOUT,
    ):
        if isinstance(endpoints, str):
            endpoints = [url for url in endpoints.split(",") if url.strip()]
        if not endpoints:
            raise ConfigError("etcd endpoints: at least one endpoint URL is needed")
        self.prefix = keys.normalize_prefix(prefix)
        self.endpoints = list(endpoints)
        tls = dict(cert=(certfile, keyfile) if certfile else None, ca_cert=cafile or None)
        auth = dict(username=username or None, password=password or None)
        self._clients = [_make_client(url, timeout, tls, auth) for url in self.endpoints]
        self._current = 0
        self._lock = threading.Lock()
        self.index_check = INDEX_CHECK
        self._index_checked: dict = {}  # watched key -> monotonic time of the last check
        self._warned_keys: set = set()

    def close(self) -> None:
        """Drop pooled connections (a parked watch's socket included)."""
        for client in self._clients:
            client.http.clear()

    def __repr__(self) -> str:
        return f"EtcdRegistry({self.endpoints!r}, prefix={self.prefix!r})"

    # -- transport ----------------------------------------------------------------

    def _call(self, action: str, method: str, *args, **kwargs):
        """Run one python-etcd call, moving to the next endpoint when one cannot be reached.
        Watch time-outs and etcd's own answers are passed through to the caller."""
        with self._lock:
            start = self._current
        last: Optional[Exception] = None
        for step in range(len(self._clients)):
            index = (start + step) % len(self._clients)
            try:
                result = getattr(self._clients[index], method)(*args, **kwargs)
            except etcd.EtcdWatchTimedOut:
                raise
            except etcd.EtcdConnectionFailed as exc:
                last = exc
                log.debug("etcd endpoint %s failed: %s", self.endpoints[index], exc)
                continue
            except (etcd.EtcdException, ValueError) as exc:  # ValueError: a non-UTF-8 page
                if not _member_trouble(exc):
                    raise
                # this member cannot serve now (no leader, raft trouble, a 5xx): another may
                # (writes compare-and-swap, so one that did land before the error is harmless)
                last = exc
                log.debug("etcd endpoint %s answered %s", self.endpoints[index], _etcd_message(exc))
                continue
            if index != start:
                with self._lock:
                    self._current = index
                log.info("switched to etcd endpoint %s", self.endpoints[index])
            return result
        if isinstance(last, (etcd.EtcdException, ValueError)) and not isinstance(
                last, etcd.EtcdConnectionFailed):
            raise RegistryError(
                f"failed to {action}: no etcd endpoint of {', '.join(self.endpoints)} can serve "
                f"now: {_etcd_message(last)}"
            ) from last
        cause = _connection_cause(last)
        raise RegistryError(
            f"failed to {action}: cannot reach etcd at {', '.join(self.endpoints)}: {cause}"
        ) from last

    def _request(self, action: str, method: str, *args, **kwargs):
        """`_call` with etcd's error answers mapped into flannel.errors."""
        try:
            return self._call(action, method, *args, **kwargs)
        except etcd.EtcdWatchTimedOut:
            raise
        except etcd.EtcdKeyNotFound as exc:
            raise NotFoundError(f"failed to {action}: {_etcd_message(exc)}") from exc
        except (etcd.EtcdCompareFailed, etcd.EtcdAlreadyExist) as exc:
            raise CompareFailed(f"failed to {action}: {_etcd_message(exc)}") from exc
        except etcd.EtcdEventIndexCleared as exc:
            raise SnapshotNeeded(str(exc)) from exc
        except etcd.EtcdInsufficientPermissions as exc:
            raise RegistryError(
                f"failed to {action}: etcd refused the request (check --etcd-username/"
                f"--etcd-password): {_etcd_message(exc)}"
            ) from exc
        except etcd.EtcdException as exc:
            raise RegistryError(f"failed to {action}: {_etcd_message(exc)}") from exc
        except (ValueError, OSError, urllib3.exceptions.HTTPError) as exc:
            # what python-etcd lets through from a garbled answer (e.g. a proxy's error page
            # that is not UTF-8, UnicodeDecodeError) is store trouble, retried like any other
            raise RegistryError(f"failed to {action}: unreadable answer from etcd: {exc}") from exc

    # -- network config -------------------------------------------------------------

    def get_network_config(self, network: str = "") -> NetworkConfig:
        key = keys.config_key(self.prefix, network)
        result = self._request(f"read network config {key}", "read", key, quorum=True)
        try:
            return NetworkConfig.parse(result.value)
        except ConfigError as exc:
            raise ConfigError(f"network config {key}: {exc}") from None

    def get_networks(self) -> Tuple[List[str], int]:
        """Names of the networks that have a `<prefix>/<name>/config` key, and the etcd index."""
        try:
            result = self._request("list networks", "read", self.prefix, recursive=True, quorum=True)
        except NotFoundError as exc:
            return [], error_index(exc)
        names = []
        for child in result._children:
            for grandchild in child.get("nodes") or ():
                name = keys.network_of_config_key(self.prefix, grandchild.get("key", ""))
                if name and not grandchild.get("dir"):
                    names.append(name)
        return sorted(names), result.etcd_index

    # -- leases -----------------------------------------------------------------------

    def get_subnets(self, network: str = "") -> Tuple[List[RawLease], int]:
        """Every lease and reservation of `network`, and the etcd index of the read."""
        key = keys.subnets_dir(self.prefix, network)
        try:
            result = self._request(f"list leases under {key}", "read", key, recursive=True, quorum=True)
        except NotFoundError as exc:
            return [], error_index(exc)
        raws = [self._decode_node(node) for node in result._children]
        return [raw for raw in raws if raw is not None], result.etcd_index

    def get_subnet(self, network: str, subnet: IPv4Network) -> RawLease:
        key = keys.subnet_key(self.prefix, network, subnet)
        result = self._request(f"read lease {key}", "read", key, quorum=True)
        raw = self._decode_node(_node_of(result))
        if raw is None:
            raise RegistryError(f"failed to read lease {key}: the stored value is not a lease")
        return RawLease(raw.lease, raw.value, raw.modified_index, result.etcd_index)

    def create_subnet(self, network: str, subnet: IPv4Network, value: str, ttl: Optional[int]) -> RawLease:
        """Create the key only if it does not exist (CompareFailed otherwise)."""
        key = keys.subnet_key(self.prefix, network, subnet)
        result = self._request(f"create lease {key}", "write", key, value, ttl=ttl, prevExist=False)
        return self._written(result, subnet, value)

    def update_subnet(
        self, network: str, subnet: IPv4Network, value: str, ttl: Optional[int], prev_index: int
    ) -> RawLease:
        """Replace the value (and TTL; None: no TTL) only if the key was not modified since
        `prev_index` (its modifiedIndex when read): a TTL change counts, a value compare would
        miss it."""
        key = keys.subnet_key(self.prefix, network, subnet)
        result = self._request(f"update lease {key}", "write", key, value, ttl=ttl, prevIndex=prev_index)
        return self._written(result, subnet, value)

    def delete_subnet(self, network: str, subnet: IPv4Network, prev_index: Optional[int] = None) -> None:
        """Delete the key (compare-and-delete on its modifiedIndex when `prev_index` is given)."""
        key = keys.subnet_key(self.prefix, network, subnet)
        extra = {"prevIndex": prev_index} if prev_index is not None else {}
        self._request(f"delete lease {key}", "delete", key, **extra)

    def _written(self, result, subnet: IPv4Network, value: str) -> RawLease:
        attrs = LeaseAttrs.from_json(value)
        lease = Lease(subnet, attrs, _expiration(result.expiration), asof=result.modifiedIndex)
        return RawLease(lease, value, result.modifiedIndex)

    # -- watches ------------------------------------------------------------------------

    def watch_subnets(
        self, network: str, after: int, timeout: float, subnet: Optional[IPv4Network] = None
    ) -> Optional[Tuple[List[Event], int]]:
        """Wait for the first change after etcd index `after` (of one lease when `subnet` is
        given, else of every lease). Returns (events, the change's index), or None on time-out.
        Raises SnapshotNeeded when the history since `after` is gone."""
        base = keys.subnets_dir(self.prefix, network)
        key = keys.subnet_key(self.prefix, network, subnet) if subnet else base
        result = self._wait(f"watch {key}", key, after, timeout)
        if result is None:
            return None
        if result.action in _REMOVED_ACTIONS and _is_ancestor(result.key, base):
            raise SnapshotNeeded(f"{result.action} of directory {result.key}")
        return self._subnet_event(result), result.modifiedIndex

    def watch_networks(self, after: int, timeout: float) -> Optional[Tuple[List[Event], int]]:
        """Wait for the first change under the prefix after index `after`; only network
        configs (and whole network directories going away) produce events."""
        result = self._wait(f"watch networks under {self.prefix}", self.prefix, after, timeout)
        if result is None:
            return None
        key = result.key or ""
        removed = result.action in _REMOVED_ACTIONS
        if removed and _is_ancestor(key, self.prefix):
            raise SnapshotNeeded(f"{result.action} of directory {key}")
        name = keys.network_of_config_key(self.prefix, key)
        if name is None and result.dir and removed:
            parent = key[len(self.prefix) + 1 :]
            name = parent if keys.is_valid_network_name(parent) else None
        if name is None:
            return [], result.modifiedIndex
        return [Event(REMOVED if removed else ADDED, network=name)], result.modifiedIndex

    def _wait(self, action: str, key: str, after: int, timeout: float):
        try:
            return self._request(
                action, "read", key, wait=True, waitIndex=after + 1, recursive=True, timeout=timeout
            )
        except etcd.EtcdWatchTimedOut:
            self._check_index(key, after)
            return None

    def _check_index(self, key: str, after: int) -> None:
        """Raise SnapshotNeeded when etcd's index is now below `after` (checked at most every
        index_check seconds per watched key: one small read)."""
        now = time.monotonic()
        if now - self._index_checked.get(key, 0.0) < self.index_check:
            return
        self._index_checked[key] = now
        index = self._current_index()
        if index is not None and index < after:
            raise SnapshotNeeded(
                f"etcd's index went back from {after} to {index} (restored from a backup or "
                "wiped?): starting over from a snapshot"
            )

    def _current_index(self) -> Optional[int]:
        """etcd's current index, from the X-Etcd-Index of a read of one small key (any key
        tells; a missing one answers with the index in its body)."""
        config = keys.config_key(self.prefix, "")
        try:
            return self._request(f"read {config}", "read", config).etcd_index
        except NotFoundError as exc:
            return error_index(exc) or None

    def _subnet_event(self, result) -> List[Event]:
        subnet = keys.key_to_subnet(result.key or "")
        if subnet is None:
            self._warn_key(result.key, "not a subnet key")
            return []
        if result.action in _REMOVED_ACTIONS:
            return [Event.removed(subnet)]
        raw = self._decode_node(_node_of(result))
        return [Event(ADDED, raw.lease)] if raw else []

    # -- decoding -------------------------------------------------------------------------

    def _decode_node(self, node: dict) -> Optional[RawLease]:
        """A raw etcd node -> RawLease; None (with one warning per key) if it is not a lease."""
        key = node.get("key") or ""
        subnet = keys.key_to_subnet(key)
        if subnet is None or node.get("dir"):
            self._warn_key(key, "a directory, not a lease" if node.get("dir") else "not a subnet key")
            return None
        value = node.get("value") or ""
        try:
            attrs = LeaseAttrs.from_json(value)
        except DecodeError as exc:
            self._warn_key(key, f"value is not a lease: {exc}")
            return None
        index = node.get("modifiedIndex") or 0
        lease = Lease(subnet, attrs, _expiration(node.get("expiration")), asof=index)
        return RawLease(lease, value, index)

    def _warn_key(self, key: str, why: str) -> None:
        if key not in self._warned_keys:
            self._warned_keys.add(key)
            log.warning("ignoring etcd key %s: %s", key, why)


def _make_client(url: str, timeout: float, tls: dict, auth: dict) -> etcd.Client:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"etcd endpoint {url!r} is not an http(s)://host:port URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"etcd endpoint {url!r} has an invalid port") from None
    opts = dict(host=parts.hostname, port=port, protocol=parts.scheme, read_timeout=timeout)
    opts.update(auth)
    if parts.scheme == "https":
        opts.update({k: v for k, v in tls.items() if v})
    client = etcd.Client(**opts)
    # No blind re-sends: a re-sent compare-and-swap could fail against its own first copy.
    # Failures go up to our endpoint rotation and the callers' back-off instead.
    client.http.connection_pool_kw["retries"] = urllib3.Retry(
        total=None, connect=0, read=0, status=0, other=0, redirect=5
    )
    return client


def _is_ancestor(key: Optional[str], path: str) -> bool:
    """True when `key` is `path` or one of its parent directories: deleting it deletes `path`."""
    key = (key or "").rstrip("/")
    return (path + "/").startswith(key + "/")


def _node_of(result) -> dict:
    return {
        "key": result.key,
        "value": result.value,
        "expiration": result.expiration,
        "modifiedIndex": result.modifiedIndex,
        "dir": result.dir,
    }


def _expiration(text: Optional[str]):
    return parse_time(text) if text else None


def error_index(exc: Exception) -> int:
    """The etcd index carried by an error answer (etcd puts it in the JSON body)."""
    payload = getattr(exc.__cause__, "payload", None) or {}
    return int(payload.get("index") or 0)


def _etcd_message(exc: Exception) -> str:
    payload = getattr(exc, "payload", None) or {}
    message = payload.get("message") or str(exc)
    cause = payload.get("cause")
    return f"{message} ({cause})" if cause else message


def _member_trouble(exc: Exception) -> bool:
    """An answer that says this member is unwell rather than that the request is wrong:
    no leader, raft trouble, a 5xx, or a page that is not etcd's JSON (a proxy's)."""
    if not isinstance(exc, etcd.EtcdException):  # a ValueError: it could not even decode the page
        return True
    payload = getattr(exc, "payload", None)
    if payload is None and type(exc) is etcd.EtcdException:
        return True  # not an etcd error answer at all (a 200 that is not etcd's JSON)
    payload = payload or {}
    status = payload.get("status") if isinstance(payload, dict) else None
    code = payload.get("errorCode") if isinstance(payload, dict) else None
    unreadable = isinstance(payload, dict) and payload.get("message") == "Bad response"
    return (isinstance(exc, etcd.EtcdLeaderElectionInProgress) or code == 300 or unreadable
            or (isinstance(status, int) and status >= 500))


def _connection_cause(exc: Optional[Exception]) -> str:
    cause = getattr(exc, "cause", None) or exc
    return str(cause) if cause is not None else "no endpoint answered"
