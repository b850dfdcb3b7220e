"""RemoteManager: the SubnetManager of `flanneld --remote=HOST:PORT`, over HTTP(S) with requests.

Each call is one request; retrying is the caller's job (the network loop retries
RegistryError, which is what an unreachable server or a 5xx becomes). `prefer` of
acquire_lease travels as a query parameter, ignored by a Go server. How long polls end
depends on the server; see RemoteManager.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
from ipaddress import IPv4Address, IPv4Network
from typing import List, Optional

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection

from flannel import __version__
from flannel.errors import OptionsError, RegistryError, RemoteError
from flannel.remote import api
from flannel.remote.tls import check_client_files
from flannel.subnet import keys
from flannel.subnet.config import NetworkConfig
from flannel.subnet.manager import SubnetManager
from flannel.subnet.models import Lease, LeaseAttrs, Reservation, WatchResult, dumps

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0   # plain requests (acquire may retry compare-and-swap on the server)
POLL_GRACE = 10.0     # read timeout of a long poll = its wait + this
# probes after 30 s idle, every 10 s, 3 unanswered: a poll parked without a read timeout
# still ends (unreachable) about a minute after the server's host vanished
KEEPALIVE = [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
]


class _KeepAliveAdapter(HTTPAdapter):
    """requests' adapter with TCP keepalive on every connection it opens."""

    def init_poolmanager(self, *args, **kwargs):
        kwargs["socket_options"] = HTTPConnection.default_socket_options + KEEPALIVE
        super().init_poolmanager(*args, **kwargs)


class RemoteManager(SubnetManager):
    """Long polls send our `wait` parameter. Our server honours it and marks every answer
    with api.POLL_BOUND_HEADER; against it a poll also has a read timeout (wait + POLL_GRACE),
    and one the server leaves unanswered ends with an empty result and the same cursor, as
    on a server-side time-out.

    A Go server ignores `wait` and parks a poll until its key changes (own lease: about a
    day), and an abandoned request keeps its goroutine and etcd watch until then. So while
    the server's answers lack the header, a long poll has no read timeout, as in Go's own
    client, and may outlast its `timeout`; TCP keepalive notices a server that vanished.
    The watch loops that poll run in daemon threads, which the daemon does not wait for,
    and close() does not wait for a parked poll either. Snapshot requests (no cursor) are
    answered at once by both servers and always have a read timeout."""

    def __init__(self, remote: str, *, cafile=None, certfile=None, keyfile=None):
        host, sep, port = remote.rpartition(":")
        if not sep or not host or not port.isdigit() or "/" in remote:
            raise OptionsError(f"--remote={remote}: expected host:port, e.g. 10.0.0.3:8888")
        check_client_files(cafile, certfile, keyfile)
        tls = bool(cafile or certfile or keyfile)
        self.base = f"{'https' if tls else 'http'}://{remote}"
        self.poll_grace = POLL_GRACE
        self._verify = cafile if cafile else True
        self._cert = (certfile, keyfile) if certfile else None
        # a session per thread: the network loop, the lease watcher and the renewer
        # each keep their own keep-alive connection, as Go's client does
        self._local = threading.local()
        self._sessions: list = []
        self._lock = threading.Lock()
        self._honours_wait = False  # as the server's latest answer says (POLL_BOUND_HEADER)

    def __repr__(self) -> str:
        return f"RemoteManager({self.base})"

    # -- HTTP ---------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.verify = self._verify
            session.cert = self._cert
            session.trust_env = False  # never route the overlay's control plane via a proxy
            session.headers.update({"User-Agent": f"flanneld-py/{__version__}",
                                    "Accept-Encoding": "identity"})
            adapter = _KeepAliveAdapter()
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _request(self, method: str, path: str, action: str, *, body: Optional[str] = None,
                 params: Optional[dict] = None,
                 read_timeout: Optional[float] = READ_TIMEOUT) -> requests.Response:
        headers = {"Content-Type": "application/json"} if body is not None else None
        try:
            resp = self._session().request(
                method, self.base + path, data=body.encode() if body is not None else None,
                params=params, headers=headers, timeout=(CONNECT_TIMEOUT, read_timeout),
            )
        except requests.exceptions.SSLError as exc:
            # a server we cannot verify is a setup error; any other TLS failure (a reset
            # mid-handshake, our certificate refused) is retried like an unreachable server
            kind = RemoteError if _chain_has(exc, ssl.SSLCertVerificationError) else RegistryError
            raise kind(
                f"failed to {action}: TLS with {self.base} failed: {_reason(exc)}{self._cert_hint(exc)}"
            ) from exc
        except requests.exceptions.ReadTimeout:
            raise
        except requests.exceptions.RequestException as exc:
            raise RegistryError(
                f"failed to {action}: server {self.base} unreachable: {_reason(exc)}{self._https_hint(exc)}"
            ) from exc
        # the latest answer decides: a server replaced by a Go one at the same address
        # must not be left with abandoned polls
        self._honours_wait = api.POLL_BOUND_HEADER in resp.headers
        if resp.status_code != 200:
            raise api.error_from_response(resp.status_code, resp.headers.get(api.ERROR_HEADER),
                                          resp.text, action)
        return resp

    def _call(self, method: str, path: str, action: str, **kwargs) -> requests.Response:
        try:
            return self._request(method, path, action, **kwargs)
        except requests.exceptions.ReadTimeout as exc:
            raise RegistryError(f"failed to {action}: server {self.base} did not answer in time") from exc

    def _cert_hint(self, exc: Exception) -> str:
        """A TLS failure of a client without a certificate, where the server demands one,
        often says no more than EOF: say what the server may want."""
        if self._cert is None and not _chain_has(exc, ssl.SSLCertVerificationError):
            return " (if the server requires client certificates, give --remote-certfile and --remote-keyfile)"
        return ""

    def _https_hint(self, exc: Exception) -> str:
        """A plain-HTTP client of an HTTPS server has its connection reset (not merely
        closed, as by a server that died): say why."""
        if self.base.startswith("https:"):
            return ""
        reset = any(isinstance(e, ConnectionResetError)
                    and not isinstance(e, http.client.RemoteDisconnected) for e in _causes(exc))
        return " (if the server serves HTTPS, give --remote-cafile)" if reset else ""

    # -- SubnetManager --------------------------------------------------------

    def get_network_config(self, network: str) -> NetworkConfig:
        resp = self._call("GET", api.path(network, "config"), f"get the config of {_name(network)}")
        return api.decode_config(resp.content)

    def acquire_lease(self, network: str, attrs: LeaseAttrs,
                      prefer: Optional[IPv4Network] = None) -> Lease:
        params = {api.PREFER: keys.subnet_to_key(prefer)} if prefer is not None else None
        resp = self._call("POST", api.path(network, "leases"), f"acquire a lease in {_name(network)}",
                          body=attrs.to_json(), params=params)
        return api.decode_lease(resp.content)

    def renew_lease(self, network: str, lease: Lease) -> Lease:
        resp = self._call("PUT", api.lease_path(network, lease.subnet), f"renew the lease of {lease.subnet}",
                          body=lease.to_json())
        return api.decode_lease(resp.content)

    def revoke_lease(self, network: str, subnet: IPv4Network,
                     holder: Optional[IPv4Address] = None) -> None:
        # the wire has no holder field: a server with client certificates checks the
        # holder against the certificate's IP itself, with a compare-and-delete
        self._call("DELETE", api.lease_path(network, subnet), f"revoke the lease of {subnet}")

    def watch_lease(self, network: str, subnet: IPv4Network, cursor: Optional[str],
                    timeout: float) -> WatchResult:
        return self._watch(api.lease_path(network, subnet), cursor, timeout,
                           f"watch the lease of {subnet}")

    def watch_leases(self, network: str, cursor: Optional[str], timeout: float) -> WatchResult:
        return self._watch(api.path(network, "leases"), cursor, timeout,
                           f"watch the leases of {_name(network)}")

    def watch_networks(self, cursor: Optional[str], timeout: float) -> WatchResult:
        return self._watch(api.path(None), cursor, timeout, "watch the networks", networks=True)

    def add_reservation(self, network: str, reservation: Reservation) -> None:
        self._call("POST", api.path(network, "reservations"), f"reserve {reservation.subnet}",
                   body=dumps(reservation.to_dict()))

    def remove_reservation(self, network: str, subnet: IPv4Network,
                           holder: Optional[IPv4Address] = None) -> None:
        # as for revoke_lease, the server checks the holder against the client certificate
        self._call("DELETE", api.lease_path(network, subnet, "reservations"),
                   f"remove the reservation of {subnet}")

    def list_reservations(self, network: str) -> List[Reservation]:
        resp = self._call("GET", api.path(network, "reservations"),
                          f"list the reservations of {_name(network)}")
        return api.decode_reservations(resp.content)

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    # -- watches ------------------------------------------------------------

    def _watch(self, path: str, cursor: Optional[str], timeout: float, action: str,
               networks: bool = False) -> WatchResult:
        timeout = max(0.0, float(timeout))
        params = {api.WAIT: f"{timeout:g}"}
        if cursor is not None:
            params[api.NEXT] = cursor
        # a snapshot is answered at once by any server; a poll is abandoned only on a
        # server that ends it by itself (see the class docstring)
        bounded = cursor is None or self._honours_wait
        read_timeout = timeout + self.poll_grace if bounded else None
        try:
            resp = self._request("GET", path, action, params=params, read_timeout=read_timeout)
        except requests.exceptions.ReadTimeout:
            if cursor is None:
                raise RegistryError(f"failed to {action}: server {self.base} did not answer in time") from None
            log.debug("%s: no answer within %.1fs although the server bounds polls", action,
                      read_timeout)
            return WatchResult(cursor=cursor)
        result = api.decode_watch(resp.content, networks=networks)
        if cursor is None and result.snapshot is None and not result.events:
            # a snapshot request answered with null: nothing exists (Go encodes [] as null)
            result = WatchResult(snapshot=(), cursor=result.cursor)
        if result.cursor is None:
            raise RemoteError(f"failed to {action}: the server's answer has no cursor")
        return result


def _name(network: str) -> str:
    return f"network {network}" if network else "the default network"


def _causes(exc: BaseException):
    """`exc` and what it wraps (requests -> urllib3 -> ssl), as far as it goes."""
    seen = 0
    while exc is not None and seen < 8:
        yield exc
        seen += 1
        exc = exc.__cause__ or exc.__context__ or (
            exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None)


def _chain_has(exc: BaseException, kind: type) -> bool:
    return any(isinstance(e, kind) for e in _causes(exc))


def _reason(exc: Exception) -> str:
    """The innermost cause of a requests error, which is the readable one."""
    *_, inner = _causes(exc)
    return str(inner) or type(inner).__name__
