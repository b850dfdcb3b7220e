"""Plumbing of the multi-host harness (tests.support.netns): run commands in a namespace, poll
for a condition, create and delete namespaces, and processes inside them that are ended only by
their own PID.

Namespaces created here are remembered until deleted; an atexit hook deletes the ones left (a
last resort after Ctrl-C or a crash: fixtures delete them in `finally`).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

_live_namespaces: set = set()  # created by this process and not yet deleted


def run(*cmd: str, ns: Optional[str] = None, check: bool = True, timeout: float = 30.0,
        input: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run a command (inside namespace `ns` when given), capturing text output."""
    argv = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """Poll `condition` until it returns something truthy; return that, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------
# namespaces


def add_namespace(name: str) -> None:
    run("ip", "netns", "add", name)
    _live_namespaces.add(name)
    run("ip", "-n", name, "link", "set", "lo", "up")


def delete_namespace(name: str) -> None:
    """SIGKILL whatever still runs inside (only our own processes live there), then delete."""
    pids = run("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    run("ip", "netns", "del", name, check=False)
    _live_namespaces.discard(name)


@atexit.register
def _remove_leftover_namespaces() -> None:
    for name in sorted(_live_namespaces):
        delete_namespace(name)


# ---------------------------------------------------------------------------
# processes


class Proc:
    """A process started inside a namespace; output goes to a log file (appended across
    restarts, each start marked), and it is ended only by its own PID."""

    def __init__(self, argv: list, ns: str, log_path: Path, env: Optional[dict] = None):
        self.argv = argv
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            log.write(f"==== start: {' '.join(argv)}\n")
            log.flush()
            # `ip netns exec` execs the command, so this PID is the command's own
            self.popen = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C in the terminal reaches pytest only
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 5.0, check: bool = True) -> int:
        """SIGTERM; with `check`, fail (after a SIGKILL) unless it exits within `timeout`."""
        if not self.alive:
            return self.popen.returncode
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            if check:
                raise AssertionError(
                    f"pid {self.pid} did not exit within {timeout}s of SIGTERM:\n{self.tail()}"
                ) from None
            return self.popen.returncode

    def kill(self) -> None:
        if self.alive:
            self.popen.kill()
        self.popen.wait(10)
