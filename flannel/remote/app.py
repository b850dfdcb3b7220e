"""The WSGI application of the server: each /v1 route turned into a SubnetManager call.

Watches are answered from the FanOut (one upstream watch per network); only a single-lease
snapshot of a lease the FanOut does not hold is read from the store. Every request ends in
an answer: bad input is a 4xx with a plain message, store trouble a 5xx, and an unexpected
exception a logged 500; each change is one SubnetManager call, so nothing is left half-done.

Long polls are bounded. A client that sent `wait` (ours) parks for at most `poll_bound`
seconds and then gets an empty result with its cursor; every answer says so in
api.POLL_BOUND_HEADER, which tells our client that it may end its polls itself. One that did
not (Go's) parks for at most `go_poll_bound` seconds and then gets a snapshot, because Go's
watch loop treats a result without events as the full state and its single-lease watch reads
the first event of a result without a snapshot; the longer bound keeps those snapshots rare
while still freeing the thread of a client that vanished without closing its connection.
"""

from __future__ import annotations

import logging
import threading
from ipaddress import IPv4Address, IPv4Network
from typing import Optional

from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.wrappers import Request, Response
from werkzeug.wsgi import ClosingIterator

from flannel.errors import (
    FlannelError, LeaseTakenError, NotFoundError, PermissionDenied, RegistryError, RemoteError,
)
from flannel.remote import api
from flannel.remote.fanout import FanOut, WatchHub
from flannel.remote.tls import peer_ips
from flannel.subnet.manager import SubnetManager
from flannel.subnet.models import Event, WatchResult

log = logging.getLogger(__name__)

POLL_BOUND = 30.0
GO_POLL_BOUND = 300.0
MAX_BODY = 64 * 1024


class Application:
    def __init__(self, manager: SubnetManager, poll_bound: float = POLL_BOUND,
                 go_poll_bound: float = GO_POLL_BOUND):
        self.manager = manager
        self.fanout = FanOut(manager)
        self.poll_bound = poll_bound
        self.go_poll_bound = go_poll_bound
        self.stopping = threading.Event()
        self._active = 0
        self._idle = threading.Condition()

    # -- WSGI ---------------------------------------------------------------

    def __call__(self, environ, start_response):
        with self._idle:
            self._active += 1
        try:
            response = self._respond(Request(environ))
            response.headers[api.POLL_BOUND_HEADER] = f"{self.poll_bound:g}"
            body = response(environ, start_response)
        except BaseException:
            self._leave()
            raise
        # a request counts as active until its answer is written (the server closes the
        # iterator then), so that stopping does not cut a woken long poll's answer
        return ClosingIterator(body, self._leave)

    def _leave(self) -> None:
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    def _respond(self, request: Request) -> Response:
        try:
            if self.stopping.is_set():
                raise RegistryError("the server is stopping")
            endpoint, args = api.ROUTES.bind_to_environ(request.environ).match()
            handler = getattr(self, f"_{endpoint}_{request.method.lower()}", None)
            if handler is None:  # HEAD, which werkzeug allows wherever GET is
                raise MethodNotAllowed()
            return handler(request, **args)
        except MethodNotAllowed as exc:
            resp = _text(exc.code, f"method {request.method} not allowed on {request.path}")
            resp.headers["Allow"] = ", ".join(exc.valid_methods or ())
            return resp
        except HTTPException as exc:
            return _text(exc.code or 400, f"{exc.name}: {request.path}")
        except FlannelError as exc:
            status = api.status_of(exc)
            log.log(logging.WARNING if status >= 500 else logging.DEBUG,
                    "%s %s: %s %s", request.method, request.path, status, exc)
            resp = _text(status, str(exc))
            resp.headers[api.ERROR_HEADER] = type(exc).__name__
            return resp
        except Exception as exc:  # never let one request take the server down
            log.exception("%s %s failed", request.method, request.path)
            return _text(500, f"internal error: {type(exc).__name__}: {exc}")

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being answered (after stop(), parked polls end at once)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def stop(self) -> None:
        self.stopping.set()
        self.fanout.close()

    # -- routes -------------------------------------------------------------

    def _config_get(self, request, network):
        config = self.manager.get_network_config(api.parse_network_segment(network))
        return _json(config.to_dict())

    def _leases_post(self, request, network):
        network = api.parse_network_segment(network)
        attrs = api.decode_attrs(_body(request))
        self._authorize(request, attrs.public_ip, "acquire a lease")
        prefer = request.args.get(api.PREFER)
        prefer_net = api.parse_subnet_segment(prefer) if prefer else None
        lease = self.manager.acquire_lease(network, attrs, prefer_net)
        return _json(lease.to_dict())

    def _lease_put(self, request, network, subnet):
        network, subnet = api.parse_network_segment(network), api.parse_subnet_segment(subnet)
        lease = api.decode_lease(_body(request))
        if lease.subnet != subnet:
            raise RemoteError(f"lease body is for {lease.subnet} but the URL names {subnet}")
        action = f"renew the lease of {subnet}"
        self._authorize(request, lease.attrs.public_ip, action)
        self._authorize_holder(request, network, subnet, action, claimed=lease.attrs.public_ip)
        return _json(self.manager.renew_lease(network, lease).to_dict())

    def _lease_delete(self, request, network, subnet):
        network, subnet = api.parse_network_segment(network), api.parse_subnet_segment(subnet)
        holder = self._authorize_holder(request, network, subnet, f"revoke the lease of {subnet}")
        self.manager.revoke_lease(network, subnet, holder)
        return Response(status=200)

    def _leases_get(self, request, network):
        network = api.parse_network_segment(network)
        return self._watch(request, self.fanout.leases(network))

    def _lease_get(self, request, network, subnet):
        network, subnet = api.parse_network_segment(network), api.parse_subnet_segment(subnet)
        return self._watch(request, self.fanout.leases(network), subnet, network)

    def _networks_get(self, request):
        return self._watch(request, self.fanout.networks())

    def _reservations_get(self, request, network):
        network = self._known(network)
        # [] when there are none, as Go's server writes (its list starts as an empty slice)
        return _json([r.to_dict() for r in self.manager.list_reservations(network)])

    def _reservations_post(self, request, network):
        network = self._known(network)
        reservation = api.decode_reservation(_body(request))
        self._authorize(request, reservation.public_ip, f"reserve {reservation.subnet}")
        self.manager.add_reservation(network, reservation)
        return Response(status=200)

    def _reservation_delete(self, request, network, subnet):
        network, subnet = self._known(network), api.parse_subnet_segment(subnet)
        holder = None
        if self._identity(request) is not None:
            mine = [r for r in self.manager.list_reservations(network) if r.subnet == subnet]
            if not mine:
                raise NotFoundError(f"no reservation for {subnet}")
            holder = mine[0].public_ip
            self._authorize(request, holder, f"remove the reservation of {subnet}")
        self.manager.remove_reservation(network, subnet, holder)
        return Response(status=200)

    def _known(self, segment: str) -> str:
        """The network named by `segment`; NotFoundError when it has no config (listing a
        missing subnets directory would otherwise look like "no reservations")."""
        network = api.parse_network_segment(segment)
        self.manager.get_network_config(network)
        return network

    # -- watches ------------------------------------------------------------

    def _watch(self, request, hub: WatchHub, key: Optional[IPv4Network] = None,
               network: str = "") -> Response:
        cursor = api.parse_cursor(request.args.get(api.NEXT))
        wait_text = request.args.get(api.WAIT)
        ours = wait_text is not None
        if cursor is None:
            return self._snapshot(hub, key, ours, network)
        bound = self.poll_bound if ours else self.go_poll_bound
        changes = hub.changes(cursor, _wait(wait_text, bound), key)
        if changes.events is None:  # the cursor is older than the window
            return self._snapshot(hub, key, ours, network)
        if changes.events:
            return _watch_json(WatchResult(events=tuple(changes.events), cursor=str(changes.cursor)))
        if ours:
            return _watch_json(WatchResult(cursor=str(changes.cursor)))
        return self._snapshot(hub, key, ours, network)

    def _snapshot(self, hub: WatchHub, key, ours: bool, network: str) -> Response:
        items, index = hub.snapshot(key)
        if key is None:
            return _watch_json(WatchResult(snapshot=items, cursor=str(index)), empty_list=ours)
        cursor = str(index)
        if not items:
            # the hub may not have seen a lease acquired a moment ago (its watch lags, or
            # backs off after an etcd outage), and "removed" makes a Go client give up its
            # lease: only the store may say it is missing, as Go's server reads it there.
            # The store's index is a valid cursor for the hub: what the hub has yet to
            # record up to it is already in this answer.
            stored = self.manager.watch_lease(network, key, None, 0.0)
            items, cursor = tuple(stored.snapshot or ()), stored.cursor
        if not items:
            # "no such lease" as an event: both Go's and our single-lease watch read it
            return _watch_json(WatchResult(events=(Event.removed(key),), cursor=cursor))
        return _watch_json(WatchResult(snapshot=items, cursor=cursor))

    # -- client certificates -------------------------------------------------

    @staticmethod
    def _identity(request):
        return peer_ips(request.environ.get("werkzeug.socket"))

    def _authorize_holder(
        self, request, network: str, subnet: IPv4Network, action: str,
        claimed: Optional[IPv4Address] = None,
    ) -> Optional[IPv4Address]:
        """With client certificates, the lease as stored must be the client's too (a body
        can claim any PublicIP); its holder is returned for a compare-and-delete. None
        without client certificates. A renewal (`claimed`: the client's own PublicIP, already
        authorised) of a lease another host holds now is told so (409), as without client
        certificates, not refused as if the certificate were wrong."""
        if self._identity(request) is None:
            return None
        current = self.manager.watch_lease(network, subnet, None, 0.0)
        leases = current.snapshot or [e.lease for e in current.events if e.type != "removed"]
        if not leases:
            raise NotFoundError(f"no lease for {subnet} in network {network or '(default)'}")
        holder = leases[0].attrs.public_ip
        if claimed is not None and holder != claimed:
            raise LeaseTakenError(
                f"lease {subnet} of network {network or '(default)'} is now held by {holder}, "
                f"not by {claimed}"
            )
        self._authorize(request, holder, action)
        return holder

    def _authorize(self, request, public_ip, action: str) -> None:
        """With client certificates, a client acts only for the PublicIP its certificate names."""
        ips = self._identity(request)
        if ips is None or public_ip in ips:
            return
        named = ", ".join(sorted(map(str, ips))) or "no IP address"
        raise PermissionDenied(
            f"not allowed to {action} for PublicIP {public_ip}: the client certificate names {named}"
        )


def _wait(text: Optional[str], bound: float) -> float:
    if text is None:
        return bound
    try:
        wait = float(text)
    except ValueError:
        raise RemoteError(f"invalid wait {text!r}: expected seconds") from None
    if not wait >= 0:
        raise RemoteError(f"invalid wait {text!r}: must not be negative")
    return min(wait, bound)


def _body(request: Request) -> bytes:
    length = request.content_length
    if length is not None and length > MAX_BODY:
        raise RemoteError(f"request body of {length} bytes is larger than {MAX_BODY}")
    data = request.stream.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise RemoteError(f"request body is larger than {MAX_BODY} bytes")
    return data


def _json(doc) -> Response:
    return Response(api.encode(doc), status=200, content_type=api.JSON_TYPE)


def _watch_json(result: WatchResult, empty_list: bool = False) -> Response:
    doc = result.to_dict()
    if empty_list and result.snapshot is not None and not result.snapshot:
        doc["snapshot"] = []  # our client tells "nothing is left" from "nothing changed"
    return _json(doc)


def _text(status: int, message: str) -> Response:
    return Response(message + "\n", status=status, content_type=api.TEXT_TYPE)
