"""Socket activation of `python -m flannel --listen=fd://` as systemd does it: a listening socket
passed as fd 3 with LISTEN_FDS/LISTEN_PID, READY=1 on $NOTIFY_SOCKET once it serves; fd://N
for a given descriptor; a wrong descriptor is a clear error."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flannel.errors import RegistryError
from flannel.remote.client import RemoteManager
from tests.support.remote import attrs, put_config

pytestmark = pytest.mark.needs_etcd

REPO = Path(__file__).resolve().parents[2]

# Moves the inherited socket to the wanted descriptor, sets LISTEN_PID to its own PID (which
# exec keeps) as systemd does, then becomes flanneld.
LAUNCHER = """
import os, sys
fd, target, listen_fds = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if fd != target:
    os.dup2(fd, target)
    os.close(fd)
if listen_fds:
    os.environ["LISTEN_FDS"] = listen_fds
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable] + sys.argv[4:])
"""


def flanneld(etcd, prefix, listen, sock=None, target=3, listen_fds="1", env=None):
    args = [f"--listen={listen}", f"--etcd-endpoints={etcd.endpoint}", f"--etcd-prefix={prefix}"]
    environ = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    fd = sock.fileno() if sock is not None else 0
    cmd = [sys.executable, "-c", LAUNCHER, str(fd), str(target), listen_fds if sock else "",
           "-m", "flannel", *args]
    if sock is None:
        cmd = [sys.executable, "-m", "flannel", *args]
    return subprocess.Popen(cmd, env=environ, pass_fds=(fd,) if sock else (),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def listener():
    sock = socket.create_server(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_listen_fd_takes_the_systemd_socket_and_notifies_ready(etcd, prefix, tmp_path):
    put_config(etcd, prefix)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    sock, port = listener()
    proc = flanneld(etcd, prefix, "fd://", sock, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    sock.close()  # only the daemon holds it now
    try:
        assert b"READY=1" in notify.recv(256)
        client = RemoteManager(f"127.0.0.1:{port}")
        assert str(client.get_network_config("").network) == "10.10.0.0/16"
        lease = client.acquire_lease("", attrs(1))
        assert lease.subnet.subnet_of(client.get_network_config("").network)
    finally:
        code = stop(proc)
        notify.close()
    assert code == 0, proc.stderr.read()


def test_listen_fd_n_takes_that_descriptor(etcd, prefix):
    put_config(etcd, prefix)
    sock, port = listener()
    proc = flanneld(etcd, prefix, "fd://5", sock, target=5, listen_fds="")
    sock.close()
    try:
        config = wait_serving(RemoteManager(f"127.0.0.1:{port}"), proc)
        assert str(config.network) == "10.10.0.0/16"
    finally:
        assert stop(proc) == 0


def wait_serving(client, proc, timeout=30.0):
    """The network config, once the daemon answers (it has no NOTIFY_SOCKET here)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.get_network_config("")
        except RegistryError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"flanneld did not serve: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")
            time.sleep(0.1)


@pytest.mark.parametrize("listen,passed,text", [
    ("fd://9", False, "9"),          # nothing open at fd 9
    ("fd://", False, "LISTEN_FDS"),  # not socket-activated at all
    ("fd://3", "file", "not a socket"),
    ("fd://3", "udp", "not a listening TCP socket"),
    ("fd://3", "unix", "is a listening AF_UNIX socket, not TCP"),
])
def test_a_wrong_descriptor_is_a_clear_error(etcd, prefix, tmp_path, listen, passed, text):
    put_config(etcd, prefix)
    holder = None
    if passed == "file":
        holder = open(tmp_path / "plain-file", "w")
    elif passed == "udp":
        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    elif passed == "unix":
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        holder.bind(str(tmp_path / "api.sock"))
        holder.listen()
    proc = flanneld(etcd, prefix, listen, holder, target=3)
    if holder is not None:
        holder.close()
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert text in err, err
