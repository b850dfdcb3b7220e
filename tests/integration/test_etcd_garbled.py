"""A garbled answer where etcd should be (a proxy's error page in Latin-1, say) is store
trouble, retried like an outage, never an exception that ends the daemon. The "etcd" here is
a plain HTTP server on loopback that answers every request with such a page."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flannel.errors import RegistryError
from flannel.subnet.etcd_registry import EtcdRegistry


class _ProxyErrorPage(BaseHTTPRequestHandler):
    def do_GET(self):
        body = "Passerelle défaillante".encode("latin-1")  # not UTF-8
        self.send_response(502)
        self.send_header("Content-Type", "text/html; charset=iso-8859-1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_POST = do_DELETE = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def garbling_proxy():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyErrorPage)
    thread = threading.Thread(target=server.serve_forever, name="garbling-proxy", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_unreadable_error_page_is_a_registry_error(garbling_proxy):
    registry = EtcdRegistry(garbling_proxy, "/garbled")
    try:
        for call in (lambda: registry.get_network_config(""),
                     lambda: registry.get_subnets("")):
            with pytest.raises(RegistryError, match="failed to"):
                call()
    finally:
        registry.close()
