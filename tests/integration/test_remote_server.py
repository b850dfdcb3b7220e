"""The API server on port 0 in front of a real etcd, driven by RemoteManager (our client) and by
raw HTTP shaped like Go's client: every route, good and bad input, error mapping, long polls,
stopping, and a watcher that outlives a server restart."""

import json
import threading
import time
from ipaddress import IPv4Address, IPv4Network

import etcd as etcd_lib
import pytest
import requests

from flannel.errors import LeaseTakenError, NotFoundError, OptionsError, RegistryError, RemoteError
from flannel.remote import api
from flannel.remote.client import RemoteManager
from flannel.remote.server import Server, serve
from flannel.subnet.etcd_registry import EtcdRegistry
from flannel.subnet.local_manager import LocalManager
from flannel.subnet.models import ADDED, REMOVED, Lease, Reservation, WatchResult
from tests.support.remote import CountingManager, attrs, local_manager, put_config, running_server

pytestmark = pytest.mark.needs_etcd


@pytest.fixture
def server(etcd, prefix):
    put_config(etcd, prefix)
    with running_server(local_manager(etcd, prefix)) as srv:
        yield srv


@pytest.fixture
def client(server):
    mgr = RemoteManager(f"127.0.0.1:{server.port}")
    yield mgr
    mgr.close()


def go_get(server, path):
    """A GET as Go's client sends it: no wait parameter, no Accept-Encoding."""
    resp = requests.get(server.url + path, headers={"User-Agent": "Go-http-client/1.1"}, timeout=40)
    assert resp.headers.get("Content-Type") == api.JSON_TYPE, resp.text
    return resp.status_code, resp.json()


def test_config_acquire_renew_revoke(etcd, prefix, client):
    config = client.get_network_config("")
    assert str(config.network) == "10.10.0.0/16" and config.subnet_len == 24
    lease = client.acquire_lease("", attrs(1, "udp"), prefer=IPv4Network("10.10.42.0/24"))
    assert lease.subnet == IPv4Network("10.10.42.0/24") and lease.expiration is not None
    stored = json.loads(etcd.client().read(f"{prefix}/subnets/10.10.42.0-24").value)
    assert stored == {"PublicIP": "192.168.77.1", "BackendType": "udp"}
    assert client.acquire_lease("", attrs(1, "udp")).subnet == lease.subnet  # reused by PublicIP
    time.sleep(0.01)
    renewed = client.renew_lease("", lease)
    assert renewed.subnet == lease.subnet and renewed.expiration >= lease.expiration
    client.revoke_lease("", lease.subnet)
    with pytest.raises(NotFoundError):
        client.renew_lease("", lease)


def test_renew_of_a_lease_taken_by_another_host(client):
    lease = client.acquire_lease("", attrs(1))
    stolen = Lease(lease.subnet, attrs(2), lease.expiration)
    with pytest.raises(LeaseTakenError, match="192.168.77.1"):
        client.renew_lease("", stolen)


def test_watch_snapshot_then_long_poll_events(client):
    first = client.acquire_lease("", attrs(1))
    snap = client.watch_leases("", None, 5)
    assert [l.subnet for l in snap.snapshot] == [first.subnet] and snap.cursor.isdigit()
    got = []
    poll = threading.Thread(target=lambda: got.append(client.watch_leases("", snap.cursor, 20)))
    poll.start()
    time.sleep(0.3)
    second = RemoteManager(client.base.split("//")[1]).acquire_lease("", attrs(2))
    poll.join(15)
    (result,) = got
    assert [(e.type, e.lease.subnet) for e in result.events] == [(ADDED, second.subnet)]
    assert int(result.cursor) > int(snap.cursor)
    # nothing more: the bounded wait ends with no events and the same cursor
    quiet = client.watch_leases("", result.cursor, 0.3)
    assert quiet.events == () and quiet.snapshot is None and quiet.cursor == result.cursor
    client.revoke_lease("", second.subnet)
    gone = client.watch_leases("", result.cursor, 10)
    assert [(e.type, e.lease.subnet, str(e.lease.attrs.public_ip)) for e in gone.events] == [
        (REMOVED, second.subnet, "0.0.0.0")
    ]


def test_single_lease_watch(client):
    lease = client.acquire_lease("", attrs(1))
    snap = client.watch_lease("", lease.subnet, None, 5)
    assert snap.snapshot == (lease,)
    client.acquire_lease("", attrs(2))  # another lease: not an event of this watch
    renewed = client.renew_lease("", lease)
    result = client.watch_lease("", lease.subnet, snap.cursor, 10)
    assert [(e.type, e.lease) for e in result.events] == [(ADDED, renewed)]
    missing = client.watch_lease("", IPv4Network("10.10.250.0/24"), None, 5)
    assert [e.type for e in missing.events] == [REMOVED]


class PausedWatch(CountingManager):
    """The server's upstream lease watch hangs after its first snapshot (as while it backs
    off after an etcd outage) until `resume` is set."""

    def __init__(self, inner):
        super().__init__(inner)
        self.resume = threading.Event()

    def watch_leases(self, network, cursor, timeout):
        if cursor is not None and not self.resume.wait(timeout):
            return WatchResult(cursor=cursor)  # "nothing new", however much changed
        return super().watch_leases(network, cursor, timeout)


def test_single_lease_snapshot_of_a_lease_the_hub_has_not_seen(etcd, prefix):
    put_config(etcd, prefix)
    manager = PausedWatch(local_manager(etcd, prefix))
    try:
        with running_server(manager) as srv:
            client = RemoteManager(f"127.0.0.1:{srv.port}")
            client.watch_leases("", None, 5)  # the hub is synced, then its watch hangs
            lease = client.acquire_lease("", attrs(1))
            key = lease.subnet.exploded.replace("/", "-")
            status, snap = go_get(srv, f"/v1/_/leases/{key}")
            assert status == 200 and snap["events"] is None
            assert [s["Subnet"] for s in snap["snapshot"]] == [str(lease.subnet)]
            assert client.watch_lease("", lease.subnet, None, 5).snapshot == (lease,)
    finally:
        manager.resume.set()


def test_reservations(etcd, prefix, server, client):
    res = Reservation(IPv4Network("10.10.7.0/24"), IPv4Address("192.168.77.7"))
    assert go_get(server, "/v1/_/reservations") == (200, [])
    assert client.list_reservations("") == []
    client.add_reservation("", res)
    assert client.list_reservations("") == [res]
    assert client.acquire_lease("", attrs(7)).subnet == res.subnet
    key = f"{prefix}/subnets/10.10.7.0-24"
    value = etcd.client().read(key).value
    client.remove_reservation("", res.subnet)
    assert client.list_reservations("") == []
    # the key stays as an ordinary lease of its host: same value, the lease TTL back
    after = etcd.client().read(key)
    assert after.value == value and 86000 < after.ttl <= 86400
    with pytest.raises(NotFoundError, match="not a reservation"):
        client.remove_reservation("", res.subnet)


def test_networks_and_named_network(etcd, prefix):
    put_config(etcd, prefix, network="blue")
    with running_server(local_manager(etcd, prefix)) as srv:
        client = RemoteManager(f"127.0.0.1:{srv.port}")
        snap = client.watch_networks(None, 5)
        assert snap.snapshot == ("blue",)
        lease = client.acquire_lease("blue", attrs(3))
        status, body = go_get(srv, "/v1/blue/leases")
        assert status == 200 and body["snapshot"][0]["Subnet"] == str(lease.subnet)
        put_config(etcd, prefix, network="green")
        result = client.watch_networks(snap.cursor, 10)
        assert [(e.type, e.network) for e in result.events] == [(ADDED, "green")]
        with pytest.raises(NotFoundError):
            client.get_network_config("red")


def test_go_shaped_requests(server):
    status, config = go_get(server, "/v1/_/config")
    assert status == 200 and config["Network"] == "10.10.0.0/16" and config["SubnetLen"] == 24
    resp = requests.post(server.url + "/v1/_/leases", data='{"PublicIP":"192.168.77.5"}',
                         headers={"Content-Type": "application/json"}, timeout=10)
    assert resp.status_code == 200 and resp.text.endswith("}\n")
    assert resp.headers[api.POLL_BOUND_HEADER] == "30"  # tells our client that polls end
    lease = resp.json()
    assert set(lease) == {"Subnet", "Attrs", "Expiration"} and lease["Expiration"].endswith("Z")
    status, snap = go_get(server, "/v1/_/leases")
    assert snap["events"] is None and isinstance(snap["cursor"], str)
    resp = requests.put(server.url + "/v1/_/leases/" + lease["Subnet"].replace("/", "-"),
                        data=json.dumps(lease), timeout=10)
    assert resp.status_code == 200
    status, event = go_get(server, f"/v1/_/leases?next={snap['cursor']}")
    assert event["snapshot"] is None and event["events"][0]["type"] == "added"
    assert event["events"][0]["lease"]["Subnet"] == lease["Subnet"]


@pytest.mark.parametrize("method,path,body,status,text", [
    ("POST", "/v1/_/leases", "{oops", 400, "invalid JSON"),
    ("POST", "/v1/_/leases", '{"PublicIP":"300.1.1.1"}', 400, "PublicIP"),
    ("PUT", "/v1/_/leases/10.10.1.0-99", "{}", 400, "invalid subnet"),
    ("DELETE", "/v1/_/leases/banana", None, 400, "invalid subnet"),
    ("GET", "/v1/nosuch/config", None, 404, "nosuch"),
    ("GET", "/v1/nosuch/leases", None, 404, "nosuch"),
    ("POST", "/v1/nosuch/leases", '{"PublicIP":"192.168.77.1"}', 404, "nosuch"),
    ("GET", "/v1/_/leases?next=yesterday", None, 400, "invalid cursor"),
    ("GET", "/v1/nosuch/reservations", None, 404, "nosuch"),
    ("POST", "/v1/_/reservations", '{"Subnet":"10.10.3.0/24"}', 400, "PublicIP is missing"),
    ("PUT", "/v1/_/leases", "{}", 405, "not allowed"),
])
def test_bad_input_is_refused_with_a_plain_message(etcd, prefix, server, method, path, body, status, text):
    resp = requests.request(method, server.url + path, data=body, timeout=10)
    assert resp.status_code == status and text in resp.text
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert _subnet_keys(etcd, prefix) == []  # a refused request writes nothing


def _subnet_keys(etcd, prefix):
    try:
        result = etcd.client().read(prefix + "/subnets", recursive=True)
    except etcd_lib.EtcdKeyNotFound:
        return []
    return [leaf.key for leaf in result.leaves if not leaf.dir]


def test_client_maps_errors(server):
    client = RemoteManager(f"127.0.0.1:{server.port}")
    with pytest.raises(NotFoundError, match="nosuch"):
        client.get_network_config("nosuch")
    dead = RemoteManager("127.0.0.1:1")
    with pytest.raises(RegistryError, match="unreachable"):
        dead.get_network_config("")
    with pytest.raises(Exception, match="expected host:port"):
        RemoteManager("http://x")


def test_etcd_trouble_is_a_5xx_and_the_server_survives(tmp_path):
    dead_etcd = LocalManager(EtcdRegistry(["http://127.0.0.1:1"], "/nowhere"))
    with running_server(dead_etcd) as srv:
        client = RemoteManager(f"127.0.0.1:{srv.port}")
        for call in (lambda: client.get_network_config(""), lambda: client.acquire_lease("", attrs(1)),
                     lambda: client.watch_leases("", None, 1)):
            with pytest.raises(RegistryError):
                call()
        resp = requests.get(srv.url + "/v1/_/config", timeout=30)
        assert resp.status_code == 503


def test_stop_ends_parked_polls_and_the_thread(etcd, prefix):
    put_config(etcd, prefix)
    stop = threading.Event()
    server_thread = threading.Thread(target=serve, args=("127.0.0.1:0", local_manager(etcd, prefix), stop))
    # serve() hides the port; use a Server for the port and serve() for the blocking contract
    srv = Server("127.0.0.1:0", local_manager(etcd, prefix)).start(stop)
    server_thread.start()
    client = RemoteManager(f"127.0.0.1:{srv.port}")
    cursor = client.watch_leases("", None, 5).cursor
    done = []
    polls = [threading.Thread(target=lambda: done.append(client.watch_leases("", cursor, 60)))
             for _ in range(5)]
    for t in polls:
        t.start()
    time.sleep(0.5)
    began = time.monotonic()
    srv.stop()
    stop.set()
    for t in polls:
        t.join(10)
    server_thread.join(10)
    assert len(done) == 5 and not server_thread.is_alive()
    assert time.monotonic() - began < 10  # not the 60 s the polls asked for
    with pytest.raises(RegistryError):
        client.get_network_config("")


def test_watcher_resumes_from_its_cursor_after_a_server_restart(etcd, prefix):
    put_config(etcd, prefix)
    srv = Server("127.0.0.1:0", local_manager(etcd, prefix)).start()
    port = srv.port
    client = RemoteManager(f"127.0.0.1:{port}")
    mine = client.acquire_lease("", attrs(1))
    other = client.acquire_lease("", attrs(2))
    cursor = client.watch_leases("", None, 5).cursor
    srv.stop()
    with pytest.raises(RegistryError):
        client.watch_leases("", cursor, 1)  # server down: retryable error
    # changes while the server is down, made by a host talking to etcd directly
    direct = local_manager(etcd, prefix)
    direct.revoke_lease("", other.subnet)
    third = direct.acquire_lease("", attrs(3))
    srv = Server(f"127.0.0.1:{port}", local_manager(etcd, prefix)).start()
    try:
        result = client.watch_leases("", cursor, 10)
        # the new server has no history from before it started: a snapshot the client diffs
        assert result.snapshot is not None
        assert {l.subnet for l in result.snapshot} == {mine.subnet, third.subnet}
        # and the watch goes on from the new cursor
        direct.revoke_lease("", third.subnet)
        after = client.watch_leases("", result.cursor, 10)
        assert [(e.type, e.lease.subnet) for e in after.events] == [(REMOVED, third.subnet)]
        assert client.renew_lease("", mine).subnet == mine.subnet  # the lease is intact
    finally:
        srv.stop()


def test_listen_errors_are_clear(etcd, prefix):
    manager = local_manager(etcd, prefix)
    with running_server(manager) as srv:
        with pytest.raises(RemoteError, match=f"failed to listen on 127.0.0.1:{srv.port}"):
            Server(f"127.0.0.1:{srv.port}", manager)
    for bad in ("8888", "host:port", "fd://x", "127.0.0.1:70000", "tcp://x", "udp://127.0.0.1:0"):
        with pytest.raises(OptionsError, match="--listen"):
            Server(bad, manager)


def test_listen_with_the_tcp_scheme(etcd, prefix):
    put_config(etcd, prefix)
    with running_server(local_manager(etcd, prefix), listen="tcp://127.0.0.1:0") as srv:
        assert srv.host == "127.0.0.1" and srv.port > 0
        client = RemoteManager(f"127.0.0.1:{srv.port}")
        assert str(client.get_network_config("").network) == "10.10.0.0/16"


def test_server_rides_out_an_etcd_outage(etcd, prefix):
    put_config(etcd, prefix)
    with running_server(local_manager(etcd, prefix)) as srv:
        client = RemoteManager(f"127.0.0.1:{srv.port}")
        first = client.acquire_lease("", attrs(1))
        cursor = client.watch_leases("", None, 5).cursor
        etcd.stop()
        try:
            with pytest.raises(RegistryError):  # a 503: retryable for the network loop
                client.acquire_lease("", attrs(2))
            # parked polls are not failed by the outage; they end with nothing new
            quiet = client.watch_leases("", cursor, 0.5)
            assert quiet.events == () and quiet.cursor == cursor
        finally:
            etcd.start()
        second = client.acquire_lease("", attrs(2))
        seen = set()
        deadline = time.monotonic() + 40
        while second.subnet not in seen and time.monotonic() < deadline:
            result = client.watch_leases("", cursor, 10)
            cursor = result.cursor
            seen |= {e.lease.subnet for e in result.events}
            seen |= {l.subnet for l in result.snapshot or ()}
        assert second.subnet in seen  # the server's watch came back by itself
        assert client.renew_lease("", first).subnet == first.subnet
