"""etcd members that answer but cannot serve: a raft error (errorCode 300, HTTP 500), a
proxy's HTML error page, a page that is not even UTF-8, a 200 that is not etcd's JSON. Each is store trouble: the registry
moves on to the next endpoint, and when none can serve it raises a RegistryError, retried
like an outage, never an exception that ends the daemon. The unwell "members" are plain HTTP
servers on loopback; the healthy one is a real etcd."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flannel.errors import RegistryError
from flannel.subnet.etcd_registry import EtcdRegistry

CONFIG = '{"Network": "10.10.0.0/16"}'
ANSWERS = {
    "raft": (500, "application/json", b'{"errorCode":300,"message":"Raft Internal Error","index":9}'),
    "proxy": (503, "text/html", b"<html><body>Service Unavailable</body></html>"),
    "latin1": (502, "text/html; charset=iso-8859-1", "Passerelle défaillante".encode("latin-1")),
    "html200": (200, "text/html", b"<html><body>Welcome to the proxy</body></html>"),
}


def _member(kind: str):
    status, ctype, body = ANSWERS[kind]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_PUT = do_POST = do_DELETE = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, name=f"member-{kind}", daemon=True).start()
    return server


@pytest.fixture
def unwell():
    servers = {kind: _member(kind) for kind in ANSWERS}
    yield {kind: f"http://127.0.0.1:{srv.server_address[1]}" for kind, srv in servers.items()}
    for srv in servers.values():
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("kind", sorted(ANSWERS))
def test_a_member_that_cannot_serve_is_a_registry_error(unwell, kind):
    registry = EtcdRegistry(unwell[kind], "/unwell")
    try:
        for call in (lambda: registry.get_network_config(""), lambda: registry.get_subnets("")):
            with pytest.raises(RegistryError, match="failed to"):
                call()
    finally:
        registry.close()


def test_the_next_endpoint_serves_when_a_member_cannot(unwell, etcd, prefix):
    etcd.client().write(prefix + "/config", CONFIG)
    registry = EtcdRegistry([unwell[kind] for kind in sorted(ANSWERS)] + [etcd.endpoint], prefix)
    try:
        assert str(registry.get_network_config("").network) == "10.10.0.0/16"
    finally:
        registry.close()
