"""The stop watchdog of flanneld's entry point, in a real child process: whatever began the
stop (a fatal error here, no signal at all), a stop that hangs is ended within the deadline
with the status the daemon had; a second signal does not cut a stop short."""

import signal
import subprocess
import sys
import textwrap
import time

from flannel.__main__ import STOP_DEADLINE

CHILD = textwrap.dedent("""
    import sys, threading, time
    from flannel.__main__ import install_signals, setup_logging
    setup_logging(0)
    stop, status = threading.Event(), [int(sys.argv[1])]
    install_signals(stop, status)
    print("ready", flush=True)
    if sys.argv[2] == "fatal":
        stop.set()          # a fatal error began the stop ...
    time.sleep(60)          # ... and the orderly stop hangs
""")


def _child(status: int, how: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(status), how],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_hanging_stop_begun_by_a_fatal_error_is_forced_with_status_1():
    proc = _child(0, "fatal")  # the daemon's status is set only once its stop returns
    try:
        assert proc.wait(STOP_DEADLINE + 20) == 1
    finally:
        proc.kill()
    assert "stopping took longer than" in proc.stderr.read()


def test_a_second_signal_leaves_the_watchdog_to_end_a_hanging_stop():
    proc = _child(0, "signal")
    try:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_DEADLINE + 20) == 0
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert "received SIGTERM while stopping" in err and "stopping took longer than" in err
