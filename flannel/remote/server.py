"""The server of the client/server mode: listening socket, TLS, threads and lifecycle.

`serve()` is what `flanneld --listen=...` runs: it listens on "host:port" (or "tcp://host:port"),
on the first socket systemd passed ("fd://") or on a given descriptor ("fd://N"), tells systemd
READY=1, answers the /v1 API (flannel.remote.app) with one thread per connection until `stop`
is set, then ends every parked long poll and closes every connection.

The TLS handshake runs in the connection's own thread: Werkzeug would do it in the accepting
thread, where one silent client would stall every other.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Optional

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from flannel import systemd
from flannel.errors import OptionsError, RemoteError
from flannel.remote.app import POLL_BOUND, Application
from flannel.remote.listen import listen_address
from flannel.remote.tls import server_context
from flannel.subnet.manager import SubnetManager

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
IDLE_CONNECTION_TIMEOUT = 300.0  # a keep-alive connection silent this long is closed
STOP_GRACE = 3.0                 # time for woken long polls to write their answers


class _Handler(WSGIRequestHandler):
    timeout = IDLE_CONNECTION_TIMEOUT

    def log_request(self, code="-", size="-") -> None:
        log.debug("%s %s %s -> %s", self.address_string(), self.command, self.path, code)

    def log_error(self, format: str, *args) -> None:
        log.info("%s: " + format, self.address_string(), *args)


class _HTTPServer(ThreadedWSGIServer):
    """Werkzeug's threaded server with the handshake moved into the connection thread and
    every open connection tracked, so that stopping can close idle keep-alive connections."""

    request_queue_size = 1024  # many hosts reconnect at once after a restart

    def __init__(self, sock: socket.socket, app, tls: Optional[ssl.SSLContext]):
        host = "::" if sock.family == socket.AF_INET6 else "0.0.0.0"
        super().__init__(host, 0, app, _Handler, fd=sock.fileno())
        self.ssl_context = tls  # after __init__: Werkzeug must not wrap the listening socket
        self._connections: set = set()
        self._connections_lock = threading.Lock()

    def process_request_thread(self, request, client_address) -> None:
        threading.current_thread().name = f"api-conn-{client_address[0]}:{client_address[1]}"
        if self.ssl_context is not None:
            request = self._handshake(request, client_address)
            if request is None:
                return
        with self._connections_lock:
            self._connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(request)

    def _handshake(self, request, client_address):
        try:
            request.settimeout(HANDSHAKE_TIMEOUT)
            tls_sock = self.ssl_context.wrap_socket(request, server_side=True)
            tls_sock.settimeout(None)
            return tls_sock
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS handshake with %s failed: %s", client_address[0], exc)
            try:
                request.close()
            except OSError:
                pass
            return None

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone


def open_listener(listen: str) -> socket.socket:
    """The listening socket for --listen (see listen_address)."""
    try:
        kind, where = listen_address(listen)
    except ValueError as exc:
        raise OptionsError(f"--listen={listen}: {exc}") from None
    if kind == "fd":
        return systemd.listening_socket(where)
    family = socket.AF_INET6 if ":" in where[0] else socket.AF_INET
    try:
        return socket.create_server(where, family=family, backlog=1024)
    except OSError as exc:
        raise RemoteError(f"failed to listen on {listen}: {exc.strerror or exc}") from None


class Server:
    """One API server. `port` is the bound port (useful with "host:0")."""

    def __init__(self, listen: str, manager: SubnetManager, *, certfile=None, keyfile=None,
                 cafile=None, poll_bound: float = POLL_BOUND):
        tls = server_context(certfile, keyfile, cafile)  # file errors before we listen
        sock = open_listener(listen)
        try:
            self.app = Application(manager, poll_bound)
            self._http = _HTTPServer(sock, self.app, tls)
        finally:
            sock.close()  # Werkzeug works on its own duplicate of the descriptor
        self.scheme = "https" if tls else "http"
        self.host, self.port = self._http.server_address[:2]
        self._thread: Optional[threading.Thread] = None
        self._died = threading.Event()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self, stop: Optional[threading.Event] = None) -> "Server":
        """Serve in a named thread; if that thread dies, `stop` is set."""
        def run():
            try:
                self._http.serve_forever(poll_interval=0.2)
            except Exception:
                log.exception("the API server failed")
                self._died.set()
                if stop is not None:
                    stop.set()

        self._thread = threading.Thread(target=run, name="remote-server", daemon=True)
        self._thread.start()
        log.info("serving the flannel API on %s://%s:%s", self.scheme, self.host, self.port)
        systemd.notify("READY=1")
        return self

    def stop(self) -> None:
        """End parked polls, stop accepting, close every connection, wait for the thread."""
        self.app.stop()
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join()
        else:
            self._http.server_close()
        self.app.wait_idle(STOP_GRACE)
        self._http.close_connections()
        log.info("API server stopped")


def serve(listen: str, manager: SubnetManager, stop: threading.Event, *, certfile=None,
          keyfile=None, cafile=None) -> None:
    """Serve the /v1 API on `listen` until `stop` is set (see the module docstring)."""
    server = Server(listen, manager, certfile=certfile, keyfile=keyfile, cafile=cafile)
    server.start(stop)
    try:
        stop.wait()
    finally:
        server.stop()
