"""A real etcd 3.4 (v2 API enabled) for tests: free loopback ports, a data dir in the test's
workdir, optional TLS, optionally inside a network namespace.

Readiness is checked the way a user would: an HTTP GET of /version (from inside the namespace
when there is one, by running this interpreter under `ip netns exec`), with etcd's own log as
the fallback when the client cannot present a certificate etcd would accept.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

ETCD_BINARY = "/usr/bin/etcd"
_READY_LINE = "ready to serve client requests"


def etcd_available() -> bool:
    return os.access(ETCD_BINARY, os.X_OK)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EtcdServer:
    """One single-member etcd cluster. `tls`: {"cert", "key", "ca", "client_cert_auth": bool,
    optional "client_cert", "client_key" used by .client() and the readiness probe}."""

    def __init__(
        self,
        workdir: Path,
        host: str = "127.0.0.1",
        client_port: int = 0,
        peer_port: int = 0,
        netns: Optional[str] = None,
        tls: Optional[dict] = None,
    ):
        self.workdir = Path(workdir)
        self.host = host
        self.netns = netns
        self.tls = dict(tls) if tls else None
        # inside a fresh namespace every port is free; in the root namespace pick free ones
        default_client, default_peer = (2379, 2380) if netns else (0, 0)
        self.client_port = client_port or default_client or free_port(host)
        self.peer_port = peer_port or default_peer or free_port(host)
        self.data_dir = self.workdir / f"etcd-{self.client_port}.data"
        self.log_path = self.workdir / f"etcd-{self.client_port}.log"
        self.proc: Optional[subprocess.Popen] = None
        self._log_offset = 0

    # -- addresses ------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    def _command(self) -> list:
        peer = f"http://{self.host}:{self.peer_port}"
        cmd = [
            ETCD_BINARY,
            "--name", "test",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}",
            "--enable-v2=true",
        ]
        if self.tls:
            cmd += ["--cert-file", self.tls["cert"], "--key-file", self.tls["key"]]
            if self.tls.get("ca"):
                cmd += ["--trusted-ca-file", self.tls["ca"]]
            if self.tls.get("client_cert_auth"):
                cmd += ["--client-cert-auth"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        return cmd

    # -- life cycle -----------------------------------------------------------

    def start(self, timeout: float = 30.0) -> "EtcdServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, wait; SIGKILL if it does not go."""
        self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self._signal_and_wait(signal.SIGKILL, 10.0)

    def restart(self, timeout: float = 30.0) -> "EtcdServer":
        """Stop and start again with the same data dir and ports."""
        self.stop()
        return self.start(timeout)

    def _signal_and_wait(self, sig: int, timeout: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # `ip netns exec` execs etcd, so the PID is etcd's either way
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "EtcdServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- readiness ------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes()[self._log_offset :].decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with status {self.proc.returncode} during start:\n"
                    + self.log_text()[-3000:]
                )
            if self._probe():
                return
            time.sleep(0.1)
        raise RuntimeError(f"etcd at {self.endpoint} not ready after {timeout}s:\n" + self.log_text()[-3000:])

    def _probe(self) -> bool:
        if _READY_LINE not in self.log_text():
            return False
        if self.tls and self.tls.get("client_cert_auth") and not self.tls.get("client_cert"):
            return True  # we hold no certificate etcd would accept; its log is the word
        if self.netns:
            return self._probe_in_netns()
        return self.http("GET", "/version", timeout=2.0, check=False)[0] == 200

    def _probe_in_netns(self) -> bool:
        code = (
            "import sys, urllib.request, ssl\n"
            "ctx = ssl._create_unverified_context()\n"
            "urllib.request.urlopen(sys.argv[1], timeout=2, context=ctx).read()\n"
        )
        cmd = ["ip", "netns", "exec", self.netns, sys.executable, "-c", code, self.endpoint + "/version"]
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0

    # -- clients --------------------------------------------------------------

    def _ssl_context(self) -> Optional[ssl.SSLContext]:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.tls.get("ca"))
        if self.tls.get("client_cert"):
            ctx.load_cert_chain(self.tls["client_cert"], self.tls.get("client_key"))
        return ctx

    def http(
        self,
        method: str,
        path: str,
        body=None,
        *,
        auth: Optional[tuple] = None,
        timeout: float = 10.0,
        check: bool = True,
    ) -> tuple:
        """A raw HTTP request to this etcd (root namespace only) -> (status, decoded JSON or text).
        `body`: a dict is sent as JSON. Connection failures give status 0 when not `check`."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.endpoint + path, data=data, method=method)
        if isinstance(body, dict):
            req.add_header("Content-Type", "application/json")
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req.add_header("Authorization", "Basic " + token)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl_context()) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (OSError, ssl.SSLError):
            if check:
                raise
            return 0, None
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        if check and status >= 300:
            raise RuntimeError(f"etcd {method} {path} -> {status}: {payload}")
        return status, payload

    def enable_v2_auth(self, password: str, revoke_guest: bool = True) -> None:
        """Create the v2 `root` user, turn v2 auth on and (by default) take every right away
        from the `guest` role, so that only authenticated requests pass."""
        self.http("PUT", "/v2/auth/users/root", {"user": "root", "password": password})
        self.http("PUT", "/v2/auth/enable")
        if revoke_guest:
            revoke = {"role": "guest", "revoke": {"kv": {"read": ["/*"], "write": ["/*"]}}}
            self.http("PUT", "/v2/auth/roles/guest", revoke, auth=("root", password))

    def client(self, **kwargs):
        """A python-etcd Client for test set-up and checks (root namespace only)."""
        import etcd

        opts = dict(host=self.host, port=self.client_port, protocol=self.scheme)
        if self.tls:
            opts["ca_cert"] = self.tls.get("ca")
            if self.tls.get("client_cert"):
                opts["cert"] = (self.tls["client_cert"], self.tls["client_key"])
        opts.update(kwargs)
        return etcd.Client(**opts)
