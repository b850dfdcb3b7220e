"""Run a function in a thread that has joined a test's network namespace.

setns(2) with CLONE_NEWNET changes only the calling thread, and sockets and TUN devices
belong to the namespace they were created in. So a short-lived thread can open a TUN or a
socket inside a test namespace and hand the fd back to the test process, without any
interface ever appearing in the root namespace. (os.setns exists only from Python 3.12.)
"""

from __future__ import annotations

import ctypes
import os
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def run_in_netns(ns: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) in a fresh thread inside namespace `ns`; its result or exception."""
    result: dict = {}

    def target():
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
