"""The systemd adapter: readiness notification (sd_notify) and socket activation (LISTEN_FDS).

Both work without libsystemd: the protocols are a datagram to $NOTIFY_SOCKET and inherited
descriptors starting at fd 3. Without systemd, notify() does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

from flannel.errors import OptionsError

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to the service manager; False when there is none."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", state, exc)
        return False


def listen_fds() -> int:
    """How many sockets systemd passed us (LISTEN_FDS, checked against LISTEN_PID)."""
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    if not count:
        return 0
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return 0
    try:
        return max(0, int(count))
    except ValueError:
        raise OptionsError(f"LISTEN_FDS={count!r} is not a number") from None


def listening_socket(fd: int | None = None) -> socket.socket:
    """The listening TCP socket for --listen=fd:// (first passed fd) or fd://N.

    Raises OptionsError naming the descriptor when it is not a listening stream socket.
    """
    if fd is None:
        if listen_fds() < 1:
            raise OptionsError(
                "--listen=fd:// needs a socket from systemd, but LISTEN_FDS/LISTEN_PID "
                "do not pass one to this process"
            )
        fd = SD_LISTEN_FDS_START
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise OptionsError(f"--listen=fd://{fd}: descriptor {fd} is not a socket ({exc.strerror})") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        sock.detach()
        raise OptionsError(f"--listen=fd://{fd}: cannot inspect descriptor {fd} ({exc.strerror})") from None
    if sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise OptionsError(f"--listen=fd://{fd}: descriptor {fd} is not a listening TCP socket")
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        family = getattr(sock.family, "name", str(sock.family))
        sock.detach()
        raise OptionsError(
            f"--listen=fd://{fd}: descriptor {fd} is a listening {family} socket, not TCP "
            "(ListenStream= in the .socket unit must be a port or an address:port)"
        )
    os.set_inheritable(fd, False)
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return sock
