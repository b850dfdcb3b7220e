"""Run flannel code inside a network namespace a test created, from the test process.

`NsAgent(ns)` starts `ip netns exec NS python -m tests.support.nsagent`: a small server that
reads pickled requests on stdin and answers on stdout. The test calls functions there
(`agent.call("flannel.dataplane.netlink:ensure_route", ...)`), creates objects kept by the
agent (`agent.new("b", "flannel.backend.vxlan:VxlanBackend", ...)`) and calls their methods
(`agent.invoke("b", "apply", events)`). Exceptions come back and are raised in the test.
`STOP` passed as an argument becomes the agent's threading.Event, set when the agent closes.

Also: `netns(name)` creates a namespace and always deletes it, `sh(ns, cmd)` runs a command
in one, `ip_json(ns, args)` reads `ip -j` output, `unique(tag)` gives a namespace name with this
helper's `fnl` prefix.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_HEADER = struct.Struct("!I")

# the agent's own stop event (only meaningful inside the agent process)
_agent_stop = threading.Event()


def _agent_stop_event() -> threading.Event:
    return _agent_stop


class _StopToken:
    def __reduce__(self):
        return (_agent_stop_event, ())


STOP = _StopToken()


def unique(tag: str) -> str:
    """A namespace name no other helper or concurrent run uses (fnl prefix, at most 15 chars)."""
    return f"fnl{uuid.uuid4().hex[:6]}{tag}"[:15]


def sh(ns: str | None, cmd: str, check: bool = True) -> str:
    """Run a shell command (inside `ns` when given); return its stdout."""
    argv = ["ip", "netns", "exec", ns, "sh", "-c", cmd] if ns else ["sh", "-c", cmd]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd!r} in {ns} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def ip_json(ns: str, args: str, tool: str = "ip") -> list:
    """The JSON output of `ip -j ARGS` (or `bridge -j ARGS`) inside `ns`; [] when empty."""
    out = sh(ns, f"{tool} -j {args}")
    return json.loads(out) if out.strip() else []


@contextlib.contextmanager
def netns(name: str):
    """A fresh network namespace with loopback up, deleted afterwards (also on failure)."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        sh(name, "ip link set lo up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def bridge_host(tag: str, cidr: str = "192.168.77.1/24"):
    """A namespace whose bridge br0 (up, holding `cidr`) stands in for the external
    interface, with an agent inside; yields the agent (its namespace is `agent.ns`)."""
    with netns(unique(tag)) as name:
        sh(name, f"ip link add br0 type bridge && ip addr add {cidr} dev br0 && ip link set br0 up")
        agent = NsAgent(name)
        try:
            yield agent
        finally:
            agent.close()


@contextlib.contextmanager
def veth_hosts(tag: str):
    """Hosts A (192.168.77.1/24) and B (192.168.77.2/24) on one veth pair, an agent in each;
    yields [(agent, name of its veth end)]."""
    prefix = unique(tag)[:11]
    with netns(prefix + "A") as host_a, netns(prefix + "B") as host_b:
        ends = (prefix + "a", prefix + "b")
        sh(None, f"ip link add {ends[0]} netns {host_a} type veth peer name {ends[1]} netns {host_b}")
        hosts = []
        try:
            for number, (ns_name, dev) in enumerate(zip((host_a, host_b), ends), start=1):
                sh(ns_name, f"ip addr add 192.168.77.{number}/24 dev {dev} && ip link set {dev} up")
                hosts.append((NsAgent(ns_name), dev))
            yield hosts
        finally:
            for agent, _dev in hosts:
                agent.close()


def thread_names() -> list:
    """Names of the live threads of the calling process (for agent.call)."""
    return sorted(t.name for t in threading.enumerate())


class NsAgent:
    """A Python process inside `ns` that runs calls for the test process."""

    def __init__(self, ns: str):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.ns = ns
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.support.nsagent"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=str(REPO),
        )
        self._lock = threading.Lock()

    def _request(self, *req):
        data = pickle.dumps(req)
        with self._lock:
            self.proc.stdin.write(_HEADER.pack(len(data)) + data)
            self.proc.stdin.flush()
            ok, value = pickle.loads(_read_frame(self.proc.stdout))
        if not ok:
            raise value
        return value

    def call(self, func: str, *args, **kwargs):
        """Call "module:function" in the namespace and return its result."""
        return self._request("call", func, args, kwargs)

    def new(self, key: str, factory: str, *args, **kwargs) -> None:
        """Create an object with "module:Class"(*args) and keep it in the agent under `key`."""
        self._request("new", key, factory, args, kwargs)

    def invoke(self, key: str, method: str, *args, **kwargs):
        """Call a method of a kept object."""
        return self._request("invoke", key, method, args, kwargs)

    def close(self) -> None:
        """Set the agent's STOP event, let it exit, and reap it (by PID)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


def _read_frame(stream) -> bytes:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("namespace agent exited")
    (size,) = _HEADER.unpack(head)
    return stream.read(size)


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _serve() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="agent %(name)s: %(message)s")
    objects: dict = {}
    rd, wr = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            req = pickle.loads(_read_frame(rd))
        except EOFError:
            break
        try:
            kind = req[0]
            if kind == "call":
                value = _resolve(req[1])(*req[2], **req[3])
            elif kind == "new":
                objects[req[1]] = _resolve(req[2])(*req[3], **req[4])
                value = None
            else:
                value = getattr(objects[req[1]], req[2])(*req[3], **req[4])
            reply = (True, value)
        except Exception as exc:  # noqa: BLE001 - handed back to the test process
            reply = (False, exc)
        try:
            data = pickle.dumps(reply)
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable exception
            data = pickle.dumps((False, RuntimeError(f"{reply[1]!r} (unpicklable: {exc})")))
        wr.write(_HEADER.pack(len(data)) + data)
        wr.flush()
    _agent_stop.set()
    for obj in objects.values():
        if hasattr(obj, "stop"):
            obj.stop()


if __name__ == "__main__":
    # run the imported module's copy, so that STOP unpickles to the event _serve sets
    from tests.support import nsagent

    nsagent._serve()
