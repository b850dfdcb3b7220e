"""Multi-host test harness: "hosts" as network namespaces on one underlay segment, a real etcd
reachable from all of them, real `flanneld` processes, and cleanup of all of it.

    underlay ns  <prefix>-u   bridge br0 192.168.77.254/24, etcd on :2379
    host ns      <prefix>-h1  eth0 192.168.77.1/24 (veth into br0), default route via .254
    host ns      <prefix>-h2  eth0 192.168.77.2/24 ...

The default route is what flanneld uses to find its external interface, so each host looks like
a real machine with one uplink. Overlay traffic only ever flows between these namespaces; the
root namespace gets no interface, route or rule.

Everything a `Cluster` made is removed by `close()` (processes by PID, then namespaces), which
fixtures call in `finally`; tests.support.nsproc's atexit hook is the last resort.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Optional

from tests.support.etcd import EtcdServer
from tests.support.nsproc import Proc, add_namespace, delete_namespace, run, wait_for

__all__ = ["Cluster", "Host", "Proc", "run", "wait_for", "ETCD_IP", "OVERLAY", "UNDERLAY_PREFIX"]

REPO = Path(__file__).resolve().parents[2]
UNDERLAY_PREFIX = "192.168.77"
ETCD_IP = f"{UNDERLAY_PREFIX}.254"
OVERLAY = "10.10.0.0/16"


# ---------------------------------------------------------------------------
# hosts


class Host:
    """One machine of the test cluster: a namespace with an uplink on the underlay."""

    def __init__(self, cluster: "Cluster", index: int):
        self.cluster = cluster
        self.index = index
        self.name = f"h{index}"
        self.ns = f"{cluster.prefix}-{self.name}"
        self.ip = f"{UNDERLAY_PREFIX}.{index}"
        self.workdir = cluster.workdir / self.name
        self.subnet_file = self.workdir / "subnet.env"
        self.log_path = self.workdir / "flanneld.log"
        self.flanneld: Optional[Proc] = None
        self._others: list = []  # iperf3 servers and the like

    def setup(self) -> None:
        add_namespace(self.ns)
        u = self.cluster.underlay
        run("ip", "-n", self.ns, "link", "add", "eth0", "type", "veth",
            "peer", "name", f"v{self.name}", "netns", u)
        run("ip", "-n", u, "link", "set", f"v{self.name}", "master", "br0", "up")
        run("ip", "-n", self.ns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        run("ip", "-n", self.ns, "link", "set", "eth0", "up")
        run("ip", "-n", self.ns, "route", "add", "default", "via", ETCD_IP)
        self.workdir.mkdir(parents=True, exist_ok=True)

    def exec(self, *cmd: str, check: bool = False, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return run(*cmd, ns=self.ns, check=check, timeout=timeout)

    def spawn(self, argv: list, log_name: str, env: Optional[dict] = None) -> Proc:
        """Start a helper process (iperf3 server...) that close() ends."""
        proc = Proc(argv, self.ns, self.workdir / log_name, env)
        self._others.append(proc)
        return proc

    # -- flanneld -------------------------------------------------------------

    def start_flanneld(self, *args: str, env: Optional[dict] = None, etcd: bool = True) -> Proc:
        """Run `python -m flannel` here with this host's subnet file; `etcd=False` leaves out
        --etcd-endpoints (for --remote clients)."""
        assert self.flanneld is None or not self.flanneld.alive, f"{self.name}: flanneld runs already"
        # our own (empty) options file: a machine-wide /etc/flannel/options.env must not leak in
        options = self.workdir / "options.env"
        options.touch()
        argv = [sys.executable, "-m", "flannel",
                f"--config-file={options}",
                f"--subnet-file={self.subnet_file}",
                f"--subnet-dir={self.workdir / 'networks'}"]
        if etcd:
            argv.append(f"--etcd-endpoints={self.cluster.etcd.endpoint}")
        argv += list(args)
        inherited = ("FLANNELD_", "NOTIFY_SOCKET", "LISTEN_")  # would change what flanneld does
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
        full_env["PYTHONPATH"] = str(REPO)
        full_env.update(env or {})
        self.flanneld = Proc(argv, self.ns, self.log_path, full_env)
        return self.flanneld

    def stop_flanneld(self, timeout: float = 5.0) -> int:
        """SIGTERM and assert flanneld exits within `timeout`; returns its exit status."""
        assert self.flanneld is not None, f"{self.name}: flanneld was never started"
        return self.flanneld.stop(timeout)

    def log_tail(self, lines: int = 40) -> str:
        return self.flanneld.tail(lines) if self.flanneld else "(flanneld never started)"

    def subnet_stamp(self) -> Optional[tuple]:
        """Identity of the current subnet file (it is replaced by rename on every write)."""
        try:
            st = self.subnet_file.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    def read_subnet_env(self) -> dict:
        values = {}
        for line in self.subnet_file.read_text().splitlines():
            if "=" in line:
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
        return values

    def wait_subnet_env(self, timeout: float = 30.0, newer_than: Optional[tuple] = None) -> dict:
        """Wait for flanneld to write the subnet file (a new one, if `newer_than` is a stamp);
        fail early, with the log, if flanneld exits."""

        def written():
            if self.flanneld is not None and not self.flanneld.alive:
                raise AssertionError(
                    f"{self.name}: flanneld exited with {self.flanneld.popen.returncode}:\n{self.log_tail()}"
                )
            stamp = self.subnet_stamp()
            return stamp is not None and stamp != newer_than

        try:
            wait_for(written, timeout, f"{self.name}'s subnet file {self.subnet_file}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {self.name} flanneld log:\n{self.log_tail()}") from None
        return self.read_subnet_env()

    def lease_subnet(self) -> str:
        """The leased subnet as '10.10.x.0/24' (from FLANNEL_SUBNET 10.10.x.1/24)."""
        return str(ipaddress.ip_interface(self.read_subnet_env()["FLANNEL_SUBNET"]).network)

    def overlay_ip(self) -> str:
        """The lease's first address (FLANNEL_SUBNET's), which the host's bridge holds."""
        return str(ipaddress.ip_interface(self.read_subnet_env()["FLANNEL_SUBNET"]).ip)

    # -- network checks -------------------------------------------------------

    def ping(self, dst: str, count: int = 1, size: Optional[int] = None, dont_fragment: bool = False,
             source: Optional[str] = None, wait: float = 2.0) -> subprocess.CompletedProcess:
        cmd = ["ping", "-n", "-c", str(count), "-W", str(wait)]
        if count > 1:
            cmd += ["-i", "0.2"]
        if size is not None:
            cmd += ["-s", str(size)]
        if dont_fragment:
            cmd += ["-M", "do"]
        if source:
            cmd += ["-I", source]
        return self.exec(*cmd, dst, timeout=count * 0.2 + wait + 10)

    def wait_ping(self, dst: str, timeout: float = 30.0, **kwargs) -> subprocess.CompletedProcess:
        """Ping until one answer comes back; fail with the last output and flanneld's log."""
        last = []

        def answered():
            last[:] = [self.ping(dst, **kwargs)]
            return last[0].returncode == 0 and last[0]

        try:
            return wait_for(answered, timeout, f"{self.name} -> {dst} ping", interval=0.5)
        except AssertionError as exc:
            out = last[0].stdout + last[0].stderr if last else ""
            raise AssertionError(f"{exc}\n{out}\n--- {self.name} flanneld log:\n{self.log_tail()}") from None

    def json(self, *cmd: str):
        """Run an iproute2 command with -j here and return the parsed JSON ([] when empty)."""
        out = self.exec(cmd[0], "-j", *cmd[1:], check=True).stdout
        return json.loads(out) if out.strip() else []

    def routes(self) -> str:
        return self.exec("ip", "-4", "route", "show", check=True).stdout

    def route_to(self, dst: str) -> Optional[dict]:
        """The main-table route to `dst` ('10.10.x.0/24') as `ip -j` gives it, or None."""
        return next((r for r in self.json("ip", "-4", "route", "show") if r.get("dst") == dst), None)

    def fdb(self, dev: str) -> str:
        return self.exec("bridge", "fdb", "show", "dev", dev, check=True).stdout

    def neighbours(self, dev: str) -> str:
        return self.exec("ip", "-4", "neigh", "show", "dev", dev, check=True).stdout

    def add_bridge_address(self, address: str, name: str = "cni0") -> None:
        """A bridge holding `address` (what docker or a CNI plugin would create), so that the
        lease's first address answers on this host."""
        self.exec("ip", "link", "add", name, "type", "bridge", check=True)
        self.exec("ip", "addr", "add", address, "dev", name, check=True)
        self.exec("ip", "link", "set", name, "up", check=True)

    def iperf3_server(self, bind: str, port: int = 5201) -> Proc:
        """A one-shot iperf3 server; returns once it listens."""
        proc = self.spawn(["iperf3", "-s", "-1", "-B", bind, "-p", str(port)], f"iperf3-{port}.log")

        def listening():
            if not proc.alive:
                raise AssertionError(f"iperf3 server exited:\n{proc.tail()}")
            return f":{port}" in self.exec("ss", "-Hltn", f"sport = :{port}").stdout

        wait_for(listening, 10, f"iperf3 server on {self.name}:{port}")
        return proc

    def iperf3_client(self, server: str, seconds: int = 3, bind: Optional[str] = None,
                      port: int = 5201) -> dict:
        """A TCP transfer to `server`; returns iperf3's JSON result (fails on error)."""
        cmd = ["iperf3", "-c", server, "-p", str(port), "-t", str(seconds), "-J",
               "--connect-timeout", "5000"]
        if bind:
            cmd += ["-B", bind]
        proc = self.exec(*cmd, timeout=seconds + 30)
        try:
            result = json.loads(proc.stdout)
        except ValueError:
            raise AssertionError(
                f"iperf3 gave no JSON ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            ) from None
        if proc.returncode != 0 or result.get("error"):
            raise AssertionError(f"iperf3 to {server} failed: {result.get('error')}\n{self.log_tail()}")
        return result

    def close(self) -> None:
        for proc in self._others + ([self.flanneld] if self.flanneld else []):
            proc.stop(check=False)


# ---------------------------------------------------------------------------
# the cluster


class Cluster:
    """N hosts plus the underlay with etcd. Use as a context manager, or call close()."""

    def __init__(self, workdir: Path, hosts: int = 3, prefix: str = "fe2e", tag: str = ""):
        self.workdir = Path(workdir)
        # unique per run so that a leftover from a killed run never collides with this one
        self.prefix = f"{prefix}{tag}{uuid.uuid4().hex[:4]}"
        self.underlay = f"{self.prefix}-u"
        self.hosts = [Host(self, i) for i in range(1, hosts + 1)]
        self.etcd: Optional[EtcdServer] = None

    def __enter__(self) -> "Cluster":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "Cluster":
        add_namespace(self.underlay)
        run("ip", "-n", self.underlay, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.underlay, "addr", "add", f"{ETCD_IP}/24", "dev", "br0")
        run("ip", "-n", self.underlay, "link", "set", "br0", "up")
        for host in self.hosts:
            host.setup()
        self.etcd = EtcdServer(self.workdir / "etcd", host=ETCD_IP, netns=self.underlay)
        self.etcd.start()
        return self

    def close(self) -> None:
        """Stop every process by PID, then delete the namespaces (also after a failed start)."""
        for host in self.hosts:
            try:
                host.close()
            except Exception:  # keep going: the namespaces must go whatever happened
                pass
        if self.etcd is not None:
            try:
                self.etcd.stop()
            except Exception:
                pass
        for host in self.hosts:
            delete_namespace(host.ns)
        delete_namespace(self.underlay)

    def start_all(self, *args: str, timeout: float = 60.0) -> list:
        """Start flanneld with `args` on every host; return their subnet.env contents."""
        for host in self.hosts:
            host.start_flanneld(*args)
        return [host.wait_subnet_env(timeout) for host in self.hosts]

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def logs(self, lines: int = 30) -> str:
        """The tail of every flanneld log, for failure reports."""
        parts = [f"--- {h.name} ({h.ip}) flanneld:\n{h.log_tail(lines)}" for h in self.hosts if h.flanneld]
        if self.etcd is not None:
            parts.append("--- etcd:\n" + "\n".join(self.etcd.log_text().splitlines()[-10:]))
        return "\n".join(parts)

    # -- etcd v2 requests, made from inside the underlay namespace ----------

    def etcd_request(self, method: str, path: str, form: Optional[dict] = None) -> tuple:
        """(status, JSON) of one etcd v2 request; `path` is below /v2/keys."""
        script = (
            "import sys, json, urllib.request, urllib.parse, urllib.error\n"
            "method, url, form = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n"
            "data = urllib.parse.urlencode(form).encode() if form else None\n"
            "req = urllib.request.Request(url, data=data, method=method)\n"
            "if data: req.add_header('Content-Type', 'application/x-www-form-urlencoded')\n"
            "try:\n"
            "    with urllib.request.urlopen(req, timeout=10) as r: code, body = r.status, r.read()\n"
            "except urllib.error.HTTPError as e: code, body = e.code, e.read()\n"
            "print(json.dumps([code, body.decode()]))\n"
        )
        url = f"{self.etcd.endpoint}/v2/keys{path}"
        proc = run(sys.executable, "-I", "-c", script, method, url, json.dumps(form or {}),
                   ns=self.underlay, timeout=20)
        code, body = json.loads(proc.stdout)
        return code, json.loads(body) if body.strip() else None

    def set_network_config(self, backend: str = "udp", network: str = OVERLAY, **extra) -> dict:
        config = {"Network": network, "Backend": {"Type": backend, **extra.pop("backend_options", {})}}
        config.update(extra)
        code, body = self.etcd_request("PUT", "/coreos.com/network/config", {"value": json.dumps(config)})
        assert code in (200, 201), f"writing the network config failed: {code} {body}"
        return config

    def leases(self) -> dict:
        """{'10.10.x.0/24': lease JSON} of every key under subnets/ (reservations included)."""
        code, body = self.etcd_request("GET", "/coreos.com/network/subnets?recursive=true")
        if code == 404:
            return {}
        assert code == 200, f"listing leases failed: {code} {body}"
        out = {}
        for node in body["node"].get("nodes") or []:
            addr, _, plen = node["key"].rsplit("/", 1)[-1].partition("-")
            out[f"{addr}/{plen}"] = json.loads(node["value"])
        return out

    def revoke_lease(self, subnet: str) -> None:
        """Delete a lease key ('10.10.x.0/24') the way an operator would."""
        key = subnet.replace("/", "-")
        code, body = self.etcd_request("DELETE", f"/coreos.com/network/subnets/{key}")
        assert code == 200, f"deleting lease {subnet} failed: {code} {body}"
