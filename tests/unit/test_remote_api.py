"""Unit tests of the client/server API pieces with an in-memory SubnetManager: the shared codec
(api), the fan-out window (fanout) and the WSGI routes (app) through Werkzeug's test client.
The same behaviour is tested against a real etcd and real sockets in tests/integration."""

import json
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, IPv4Network

import pytest
from werkzeug.test import Client

from flannel.errors import (
    ConfigError,
    LeaseError,
    LeaseTakenError,
    NotFoundError,
    PermissionDenied,
    RegistryError,
    RemoteError,
)
from flannel.remote import api
from flannel.remote.app import Application
from flannel.remote.fanout import WatchHub, _LeaseKind
from flannel.subnet.config import NetworkConfig
from flannel.subnet.manager import SubnetManager
from flannel.subnet.models import ADDED, REMOVED, Event, Lease, LeaseAttrs, Reservation, WatchResult

NET = IPv4Network("10.5.0.0/16")


def _lease(third: int, ip: str = "192.168.77.1") -> Lease:
    exp = datetime(2030, 1, 1, tzinfo=timezone.utc)
    return Lease(IPv4Network(f"10.5.{third}.0/24"), LeaseAttrs(IPv4Address(ip)), exp)


class FakeManager(SubnetManager):
    """Leases in a dict, every change numbered like etcd's index; counts watch calls."""

    def __init__(self):
        self.cond = threading.Condition()
        self.index = 10
        self.leases = {}
        self.history = []
        self.watch_calls = 0
        self.config = NetworkConfig.parse({"Network": str(NET)})
        self.fail = None

    def _change(self, event):
        with self.cond:
            self.index += 1
            if event.type == ADDED:
                self.leases[event.lease.subnet] = event.lease
            else:
                self.leases.pop(event.lease.subnet, None)
            self.history.append((self.index, event))
            self.cond.notify_all()

    def _check(self, network):
        if self.fail:
            raise self.fail
        if network not in ("", "blue"):
            raise NotFoundError(f"network {network} has no config")

    def get_network_config(self, network):
        self._check(network)
        return self.config

    def acquire_lease(self, network, attrs, prefer=None):
        self._check(network)
        for lease in self.leases.values():
            if lease.attrs.public_ip == attrs.public_ip:
                return lease
        free = [s for s in self.config.subnets() if s not in self.leases]
        subnet = prefer if prefer in free else free[0]
        lease = Lease(subnet, attrs, datetime.now(timezone.utc) + timedelta(hours=24))
        self._change(Event(ADDED, lease))
        return lease

    def renew_lease(self, network, lease):
        current = self.leases.get(lease.subnet)
        if current is None:
            raise NotFoundError(f"lease {lease.subnet} is gone")
        if current.attrs.public_ip != lease.attrs.public_ip:
            raise LeaseTakenError(f"{lease.subnet} is held by {current.attrs.public_ip}")
        renewed = Lease(lease.subnet, lease.attrs, datetime.now(timezone.utc) + timedelta(hours=24))
        self._change(Event(ADDED, renewed))
        return renewed

    def revoke_lease(self, network, subnet, holder=None):
        current = self.leases.get(subnet)
        if holder is not None and current is not None and current.attrs.public_ip != holder:
            raise LeaseTakenError(f"{subnet} is held by {current.attrs.public_ip}")
        self._change(Event.removed(subnet))

    def watch_leases(self, network, cursor, timeout):
        self._check(network)
        with self.cond:
            self.watch_calls += 1
            if cursor is None:
                return WatchResult(snapshot=tuple(self.leases.values()), cursor=str(self.index))
            after = int(cursor)
            self.cond.wait_for(lambda: self.index > after, timeout)
            for index, event in self.history:
                if index > after:
                    return WatchResult(events=(event,), cursor=str(index))
            return WatchResult(cursor=cursor)

    def watch_lease(self, network, subnet, cursor, timeout):
        lease = self.leases.get(subnet)
        return WatchResult(snapshot=(lease,) if lease else (), cursor=str(self.index))

    def watch_networks(self, cursor, timeout):
        return WatchResult(snapshot=("blue",), cursor=str(self.index))

    def add_reservation(self, network, reservation):
        self._change(Event(ADDED, Lease(reservation.subnet, LeaseAttrs(reservation.public_ip))))

    def remove_reservation(self, network, subnet, holder=None):
        current = self.leases.get(subnet)
        if current is None or not current.is_reservation:
            raise NotFoundError(f"no reservation for {subnet}")
        # as LocalManager (and Go): the holder keeps the subnet as a lease with a TTL
        expiration = datetime.now(timezone.utc) + timedelta(hours=24)
        self._change(Event(ADDED, Lease(subnet, current.attrs, expiration)))

    def list_reservations(self, network):
        return [Reservation(s, l.attrs.public_ip) for s, l in self.leases.items() if l.is_reservation]


# ---------------------------------------------------------------------------
# api


def test_segments_and_cursor():
    assert api.parse_network_segment("_") == ""
    assert api.parse_network_segment("blue") == "blue"
    assert api.path("", "leases") == "/v1/_/leases"
    assert api.lease_path("blue", IPv4Network("10.1.34.0/24")) == "/v1/blue/leases/10.1.34.0-24"
    assert api.parse_subnet_segment("10.1.34.0-24") == IPv4Network("10.1.34.0/24")
    for bad in ("10.1.34.1-24", "10.1.34.0", "x", "10.1.34.0-33"):
        with pytest.raises(RemoteError, match="invalid subnet"):
            api.parse_subnet_segment(bad)
    for bad in ("config", "a b", ".."):
        with pytest.raises(RemoteError, match="invalid network name"):
            api.parse_network_segment(bad)
    assert api.parse_cursor("17") == 17 and api.parse_cursor(None) is None
    with pytest.raises(RemoteError, match="invalid cursor"):
        api.parse_cursor("-1")


@pytest.mark.parametrize("exc", [PermissionDenied("x"), NotFoundError("x"), LeaseTakenError("x"),
                                 LeaseError("x"), ConfigError("x"), RegistryError("x"), RemoteError("x")])
def test_errors_survive_the_wire(exc):
    status = api.status_of(exc)
    back = api.error_from_response(status, type(exc).__name__, "boom", "do it")
    assert type(back) is type(exc) and "do it" in str(back) and "boom" in str(back)


def test_go_statuses_map_to_retryable_or_refused():
    assert isinstance(api.error_from_response(500, None, "etcd down", "x"), RegistryError)
    assert isinstance(api.error_from_response(400, None, "bad", "x"), RemoteError)
    assert isinstance(api.error_from_response(404, "NoSuchClass", "", "x"), NotFoundError)


def test_decode_watch_tells_empty_snapshot_from_no_snapshot():
    assert api.decode_watch('{"events":null,"snapshot":[],"cursor":"5"}').snapshot == ()
    assert api.decode_watch('{"events":null,"snapshot":null,"cursor":"5"}').snapshot is None
    with pytest.raises(RemoteError, match="invalid JSON"):
        api.decode_watch("{")


def test_decode_reservations_reads_ours_and_null():
    res = Reservation(IPv4Network("10.5.9.0/24"), IPv4Address("192.168.77.9"))
    assert api.decode_reservations("[]\n") == [] and api.decode_reservations("null\n") == []
    assert api.decode_reservations(api.encode([res.to_dict()])) == [res]
    with pytest.raises(RemoteError, match="expected a JSON list"):
        api.decode_reservations("{}")


# ---------------------------------------------------------------------------
# fanout


def _hub(manager, window=1000):
    fetch = lambda cursor, timeout: manager.watch_leases("", cursor, timeout)  # noqa: E731
    closing = threading.Event()
    hub = WatchHub("test", fetch, _LeaseKind, closing, window)
    hub.ensure_synced()
    return hub, closing


def _catch_up(hub, manager):
    """Wait until the hub has recorded every change of the store."""
    deadline = time.monotonic() + 5
    while hub.snapshot()[1] < manager.index and time.monotonic() < deadline:
        time.sleep(0.02)


def test_hub_wakes_every_parked_poll_with_one_upstream_watch():
    manager = FakeManager()
    hub, closing = _hub(manager)
    try:
        _, cursor = hub.snapshot()
        results = []
        pollers = [threading.Thread(target=lambda: results.append(hub.changes(cursor, 20.0)))
                   for _ in range(30)]
        for t in pollers:
            t.start()
        time.sleep(0.3)
        calls_before = manager.watch_calls
        manager.acquire_lease("", LeaseAttrs(IPv4Address("192.168.77.9")))
        for t in pollers:
            t.join(10)
        assert len(results) == 30
        assert all(r.events and r.events[0].lease.attrs.public_ip == IPv4Address("192.168.77.9")
                   for r in results)
        # the 30 polls cost the store at most a couple of watch calls, not 30
        assert manager.watch_calls - calls_before <= 3
    finally:
        closing.set()


def test_hub_window_overflow_gives_snapshot_and_single_key_filter():
    manager = FakeManager()
    hub, closing = _hub(manager, window=3)
    try:
        _, old = hub.snapshot()
        for third in range(1, 7):
            manager._change(Event(ADDED, _lease(third)))
        _catch_up(hub, manager)
        assert hub.changes(old, 0).events is None  # too old: caller sends a snapshot
        recent = hub.changes(manager.index - 1, 0)
        assert [e.lease.subnet for e in recent.events] == [IPv4Network("10.5.6.0/24")]
        one = hub.changes(manager.index - 3, 0, key=IPv4Network("10.5.5.0/24"))
        assert [e.lease.subnet for e in one.events] == [IPv4Network("10.5.5.0/24")]
        assert one.cursor == manager.index - 1  # that event's own index
        assert hub.changes(manager.index, 0.05).events == []
    finally:
        closing.set()


def test_single_lease_poll_delivers_each_event_in_turn():
    """Go's client reads only Events[0]: a lease revoked and taken by another host must reach
    it as "removed" first, or it never learns that it lost the lease."""
    manager = FakeManager()
    hub, closing = _hub(manager)
    try:
        mine = manager.acquire_lease("", LeaseAttrs(IPv4Address("192.168.77.1")))
        _catch_up(hub, manager)
        _, cursor = hub.snapshot()
        manager.revoke_lease("", mine.subnet)
        manager.acquire_lease("", LeaseAttrs(IPv4Address("192.168.77.2")), prefer=mine.subnet)
        manager.acquire_lease("", LeaseAttrs(IPv4Address("192.168.77.3")))  # another key
        _catch_up(hub, manager)
        seen = []
        for _ in range(2):
            got = hub.changes(cursor, 5.0, key=mine.subnet)
            seen += [(e.type, str(e.lease.attrs.public_ip), got.cursor) for e in got.events]
            cursor = got.cursor
        assert seen == [(REMOVED, "0.0.0.0", manager.index - 2),
                        (ADDED, "192.168.77.2", manager.index - 1)]
    finally:
        closing.set()


def test_hub_turns_upstream_snapshot_into_events():
    hub = WatchHub("t", None, _LeaseKind, threading.Event())
    hub._state = {_lease(1).subnet: _lease(1), _lease(2).subnet: _lease(2)}
    hub._index = hub._floor = 10
    hub._apply(WatchResult(snapshot=(_lease(2), _lease(3)), cursor="20"))
    got = hub.changes(10, 0).events
    assert {(e.type, str(e.lease.subnet)) for e in got} == {(REMOVED, "10.5.1.0/24"), (ADDED, "10.5.3.0/24")}
    assert hub.snapshot()[1] == 20


# ---------------------------------------------------------------------------
# app (WSGI routes)


@pytest.fixture
def app():
    application = Application(FakeManager(), poll_bound=0.3, go_poll_bound=0.3)
    yield application
    application.stop()


def _get_json(client, url):
    resp = client.get(url)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == api.JSON_TYPE
    return json.loads(resp.text)


def test_routes_round_trip(app):
    client = Client(app)
    assert _get_json(client, "/v1/_/config")["Network"] == str(NET)
    resp = client.post("/v1/_/leases?prefer=10.5.7.0-24", data='{"PublicIP":"192.168.77.1"}')
    lease = json.loads(resp.text)
    assert resp.status_code == 200 and lease["Subnet"] == "10.5.7.0/24"
    resp = client.put("/v1/_/leases/10.5.7.0-24", data=json.dumps(lease))
    assert resp.status_code == 200 and json.loads(resp.text)["Subnet"] == "10.5.7.0/24"
    snap = _get_json(client, "/v1/_/leases")
    assert snap["events"] is None and [s["Subnet"] for s in snap["snapshot"]] == ["10.5.7.0/24"]
    assert isinstance(snap["cursor"], str)
    one = _get_json(client, "/v1/_/leases/10.5.7.0-24")
    assert one["snapshot"][0]["Attrs"]["PublicIP"] == "192.168.77.1"
    assert client.delete("/v1/_/leases/10.5.7.0-24").status_code == 200
    gone = _get_json(client, f"/v1/_/leases?next={snap['cursor']}")
    assert gone["events"][-1]["type"] == "removed"
    assert gone["events"][-1]["lease"]["Attrs"] == {"PublicIP": "0.0.0.0"}
    assert _get_json(client, "/v1/_/reservations") == []  # Go's server writes [], not null
    assert _get_json(client, "/v1/")["snapshot"] == ["blue"]


@pytest.mark.parametrize("method,url,body,status,text", [
    ("post", "/v1/_/leases", "{not json", 400, "invalid JSON"),
    ("post", "/v1/_/leases", '{"PublicIP":"192.168.77.9","BackendData":{"x":NaN}}', 400, "NaN is not JSON"),
    ("post", "/v1/_/reservations", '{"Subnet":"10.5.9.0/24","PublicIP":"192.168.77.9","x":Infinity}', 400,
     "Infinity is not JSON"),
    ("post", "/v1/_/leases", '{"BackendType":"udp"}', 400, "PublicIP is missing"),
    ("put", "/v1/_/leases/10.5.7.1-24", "{}", 400, "invalid subnet"),
    ("put", "/v1/_/leases/10.5.8.0-24", _lease(7).to_json(), 400, "URL names"),
    ("put", "/v1/_/leases/10.5.7.0-24", _lease(7).to_json(), 404, "gone"),
    ("get", "/v1/red/config", None, 404, "no config"),
    ("get", "/v1/red/leases", None, 404, "no config"),
    ("get", "/v1/config/leases", None, 400, "invalid network name"),
    ("get", "/v1/_/leases?next=abc", None, 400, "invalid cursor"),
    ("get", "/v1/_/leases?next=1&wait=x", None, 400, "invalid wait"),
    ("patch", "/v1/_/leases", None, 405, "not allowed"),
    ("get", "/v2/nothing", None, 404, "Not Found"),
])
def test_bad_requests_are_4xx_with_a_plain_message(app, method, url, body, status, text):
    resp = getattr(Client(app), method)(url, data=body)
    assert resp.status_code == status
    assert text in resp.text and resp.headers["Content-Type"].startswith("text/plain")


def test_store_trouble_is_503_and_bugs_are_500(app):
    client = Client(app)
    app.manager.fail = RegistryError("etcd unreachable")
    resp = client.get("/v1/_/config")
    assert resp.status_code == 503 and resp.headers[api.ERROR_HEADER] == "RegistryError"
    app.manager.fail = ZeroDivisionError("bug")
    resp = client.get("/v1/_/config")
    assert resp.status_code == 500 and "internal error" in resp.text


def test_time_out_answer_depends_on_the_client(app):
    client = Client(app)
    client.post("/v1/_/leases", data='{"PublicIP":"192.168.77.1"}')
    cursor = _get_json(client, "/v1/_/leases")["cursor"]
    # ours (sent wait): an empty result with the same cursor
    ours = _get_json(client, f"/v1/_/leases?next={cursor}&wait=0.1")
    assert ours == {"events": None, "snapshot": None, "cursor": cursor}
    # Go's (no wait): a snapshot, since Go treats a result without events as the full state
    go = _get_json(client, f"/v1/_/leases?next={cursor}")
    assert go["events"] is None and len(go["snapshot"]) == 1
    # Go's single-lease watch reads Events[0] when there is no snapshot: never send neither
    missing = _get_json(client, f"/v1/_/leases/10.5.99.0-24?next={cursor}")
    assert missing["events"][0]["type"] == "removed"


def test_single_lease_snapshot_reads_the_store_when_the_hub_lags(app):
    """A lease the hub has not seen yet (its upstream watch lags) is still in the snapshot;
    only the store may say "removed", which makes a Go client give up its lease."""
    client = Client(app)
    cursor = _get_json(client, "/v1/_/leases")["cursor"]  # the hub is synced now
    fresh = _lease(3)
    app.manager.leases[fresh.subnet] = fresh  # in the store, unseen by the hub's watch
    for url in ("/v1/_/leases/10.5.3.0-24", f"/v1/_/leases/10.5.3.0-24?next={cursor}"):
        answer = _get_json(client, url)
        assert answer["events"] is None, url
        assert [s["Subnet"] for s in answer["snapshot"]] == ["10.5.3.0/24"], url
        assert answer["cursor"] == str(app.manager.index)
    missing = _get_json(client, "/v1/_/leases/10.5.4.0-24")
    assert missing["events"][0]["type"] == "removed" and missing["snapshot"] is None


def test_stop_ends_parked_polls_at_once():
    application = Application(FakeManager(), poll_bound=60)
    client = Client(application)
    cursor = _get_json(client, "/v1/_/leases")["cursor"]
    got = []
    t = threading.Thread(target=lambda: got.append(client.get(f"/v1/_/leases?next={cursor}&wait=60")))
    t.start()
    time.sleep(0.3)
    application.stop()
    t.join(5)
    assert not t.is_alive() and got[0].status_code == 200
    assert client.get("/v1/_/config").status_code == 503


class StubServer:
    """An HTTP/1.1 server that answers GET config, marked as our server or not (`ours`), and
    leaves every other request unanswered until release(); records the paths it was sent."""

    def __init__(self, ours: bool):
        stub = self
        self.ours = ours
        self.paths = []
        self.released = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                stub.paths.append(self.path)
                if not self.path.endswith("/config"):
                    stub.released.wait()
                    self.close_connection = True  # never answered
                    return
                body = api.encode({"Network": str(NET)})
                self.send_response(200)
                if stub.ours:
                    self.send_header(api.POLL_BOUND_HEADER, "30")
                self.send_header("Content-Type", api.JSON_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.address = f"127.0.0.1:{self.http.server_address[1]}"

    def polls(self) -> int:
        return sum(1 for p in self.paths if "next=" in p)

    def release(self) -> None:
        self.released.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def stub_server(request):
    stub = StubServer(ours=request.param)
    yield stub
    stub.release()


def _remote(stub):
    from flannel.remote.client import RemoteManager

    client = RemoteManager(stub.address)
    client.poll_grace = 0.2
    client.get_network_config("")  # the first answer says which kind of server it is
    return client


@pytest.mark.parametrize("stub_server", [False], indirect=True)
def test_client_leaves_a_poll_parked_on_a_go_server(stub_server):
    """A Go server ignores `wait` and keeps an abandoned poll's etcd watch until the key changes:
    with a server that does not mark its answers as ours, a long poll has no read timeout, so
    none is abandoned (and sent again), and close() does not wait for it."""
    client = _remote(stub_server)
    with pytest.raises(RegistryError, match="did not answer"):
        client.watch_leases("", None, 0.1)  # a snapshot request must be answered
    got = []

    def poll():
        try:
            got.append(client.watch_leases("", "41", 0.1))
        except RegistryError as exc:
            got.append(exc)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    poller.join(1.5)  # far past wait + grace
    assert poller.is_alive() and got == [] and stub_server.polls() == 1
    closer = threading.Thread(target=client.close, daemon=True)
    closer.start()
    closer.join(5)
    assert not closer.is_alive()
    stub_server.release()  # the server goes away: the parked poll ends with a retryable error
    poller.join(5)
    assert not poller.is_alive() and isinstance(got[0], RegistryError)


@pytest.mark.parametrize("stub_server", [True], indirect=True)
def test_client_ends_a_poll_that_our_server_does_not_answer_in_time(stub_server):
    """Our server honours `wait`: a poll it leaves unanswered is ended by the read timeout
    with an empty result and the same cursor, as the SubnetManager contract says."""
    client = _remote(stub_server)
    assert client.watch_leases("", "41", 0.1) == WatchResult(cursor="41")
    with pytest.raises(RegistryError, match="did not answer"):
        client.watch_leases("", None, 0.1)


@pytest.mark.parametrize("stub_server", [False, True], indirect=True)
def test_client_connections_use_tcp_keepalive(stub_server):
    """A poll without a read timeout still notices a server host that vanished."""
    client = _remote(stub_server)
    pools = client._session().get_adapter(client.base).poolmanager.pools
    idle = [c for key in pools.keys() for c in pools[key].pool.queue]
    socks = [c.sock for c in idle if c is not None and c.sock is not None]
    assert socks
    for sock in socks:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30


def test_every_answer_of_our_server_says_it_bounds_polls(app):
    client = Client(app)
    for method, url in (("get", "/v1/_/config"), ("get", "/v1/red/config"),
                        ("patch", "/v1/_/leases"), ("get", "/v2/x")):
        resp = getattr(client, method)(url)
        assert resp.headers.get(api.POLL_BOUND_HEADER) == "0.3", (method, url, resp.status_code)


def test_idle_hubs_stop_and_come_back_on_demand():
    from flannel.remote.fanout import FanOut

    manager = FakeManager()
    fanout = FanOut(manager, idle=0.2)
    try:
        hub = fanout.leases("")
        with pytest.raises(NotFoundError):
            fanout.leases("red")  # no config: no hub, no watch
        assert fanout.hub_count() == 1
        deadline = time.monotonic() + 10
        while fanout.hub_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fanout.hub_count() == 0 and hub.closed
        manager.acquire_lease("", LeaseAttrs(IPv4Address("192.168.77.3")))
        items, _ = fanout.leases("").snapshot()
        assert [str(l.attrs.public_ip) for l in items] == ["192.168.77.3"]
    finally:
        fanout.close()


def _one_shot_server(reset: bool):
    """A TCP server on loopback that reads a request and then closes the connection
    (reset: with an RST, as a TLS server does to a plain-HTTP request; else a plain close,
    as a server that died)."""
    import socket
    import struct

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve():
        conn, _ = listener.accept()
        conn.recv(4096)
        if reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        listener.close()

    threading.Thread(target=serve, name="one-shot", daemon=True).start()
    return listener.getsockname()[1]


@pytest.mark.parametrize("reset, hinted", [(True, True), (False, False)])
def test_the_https_hint_only_for_a_reset_connection(reset, hinted):
    from flannel.remote.client import RemoteManager

    port = _one_shot_server(reset)
    client = RemoteManager(f"127.0.0.1:{port}")
    try:
        with pytest.raises(RegistryError) as refused:
            client.get_network_config("")
    finally:
        client.close()
    assert ("serves HTTPS, give --remote-cafile" in str(refused.value)) is hinted


def test_no_certificate_hint_when_an_https_server_is_merely_down(tmp_path):
    import trustme

    from flannel.remote.client import RemoteManager
    from tests.support.etcd import free_port

    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    client = RemoteManager(f"127.0.0.1:{free_port()}", cafile=str(ca))
    try:
        with pytest.raises(RegistryError) as refused:
            client.get_network_config("")
    finally:
        client.close()
    assert "unreachable" in str(refused.value) and "client certificates" not in str(refused.value)
