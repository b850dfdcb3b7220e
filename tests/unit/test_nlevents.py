"""The rtnetlink notification parser on hand-made messages, and the re-check thread's timing
with a fake change monitor: a burst of notifications is one check, no notification is no
check, failures are retried every interval, halt() ends it at once. A real kernel's
notifications are read in tests/integration/test_nlevents.py."""

import socket
import struct
import threading
import time

import pytest

from flannel.backend.peers import Rechecker
from flannel.dataplane import nlevents
from flannel.errors import BackendError


def nlmsg(mtype, payload):
    return struct.pack("=IHHII", 16 + len(payload), mtype, 0, 0, 0) + payload + b"\0" * (-len(payload) % 4)


def ifinfo(index):
    return struct.pack("=BxHiII", 0, 1, index, 0, 0)


def ndmsg(index):
    return struct.pack("=BxxxiHBB", 2, index, 0x80, 0, 1)


def rtattr(atype, data):
    return struct.pack("=HH", 4 + len(data), atype) + data + b"\0" * (-len(data) % 4)


def rtmsg(*attrs):
    return struct.pack("=BBBBBBBBI", 2, 24, 0, 0, 254, 3, 0, 1, 0) + b"".join(attrs)


def test_messages_split_a_datagram_and_drop_a_truncated_tail():
    data = nlmsg(16, ifinfo(3)) + nlmsg(28, ndmsg(4)) + nlmsg(24, rtmsg())[:20]
    assert [(t, len(p)) for t, p in nlevents.messages(data)] == [(16, 16), (28, 12)]
    assert list(nlevents.messages(b"\x01\x00")) == []
    assert list(nlevents.messages(struct.pack("=IHHII", 4, 16, 0, 0, 0))) == []  # length below a header


@pytest.mark.parametrize("mtype, payload, want", [
    (nlevents.RTM_NEWLINK, ifinfo(7), ("link", 7)),
    (nlevents.RTM_DELLINK, ifinfo(8), ("link", 8)),
    (nlevents.RTM_DELNEIGH, ndmsg(9), ("neighbour", 9)),
    (nlevents.RTM_NEWNEIGH, ndmsg(10), ("neighbour", 10)),
    # RTA_DST first, then RTA_GATEWAY, then RTA_OIF: the walk skips the others
    (nlevents.RTM_DELROUTE, rtmsg(rtattr(1, bytes(4)), rtattr(5, bytes(4)), rtattr(4, struct.pack("=i", 11))),
     ("route", 11)),
    (nlevents.RTM_NEWROUTE, rtmsg(rtattr(1, bytes(4))), ("route", 0)),  # no RTA_OIF
    (nlevents.RTM_NEWROUTE, rtmsg(struct.pack("=HH", 2, 4)), ("route", 0)),  # a bad attribute length
    (nlevents.RTM_NEWROUTE, b"\0" * 8, ("", 0)),  # shorter than a route header
    (20, b"\0" * 16, ("", 0)),  # RTM_NEWADDR: not one we follow
])
def test_message_link(mtype, payload, want):
    assert nlevents.message_link(mtype, payload) == want


# -- the re-check thread ------------------------------------------------------------------

class FakeMonitor:
    """A ChangeMonitor whose notifications a test sends through a socket pair."""

    def __init__(self):
        self.inbox, self.outbox = socket.socketpair()
        self.inbox.setblocking(False)
        self.closed = False

    def notify(self, count=1):
        for _ in range(count):
            self.outbox.send(b"n")

    def fileno(self):
        return self.inbox.fileno()

    def drain(self):
        got = False
        while True:
            try:
                got |= bool(self.inbox.recv(4096))
            except BlockingIOError:
                return got

    def close(self):
        self.closed = True
        self.inbox.close()


class Counter:
    def __init__(self, fail=0):
        self.calls, self.fail = [], fail

    def __call__(self):
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.fail:
            raise BackendError("the kernel refuses")
        return 0


def wait_until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


@pytest.fixture
def stop():
    return threading.Event()


def test_notifications_wake_one_check_per_burst(stop):
    monitor, fix = FakeMonitor(), Counter()
    checker = Rechecker("t-burst", "test entries", fix, 0.4, lambda: monitor)
    checker.start(stop)
    time.sleep(0.6)
    assert fix.calls == []  # nothing happened: no check at all
    for _ in range(50):  # a burst of notifications over 0.5 s
        monitor.notify()
        time.sleep(0.01)
    time.sleep(0.9)
    # at most one check per interval: the first at once, then one per 0.4 s of the burst
    assert 1 <= len(fix.calls) <= 3, fix.calls
    gaps = [b - a for a, b in zip(fix.calls, fix.calls[1:])]
    assert all(gap >= 0.39 for gap in gaps), gaps
    checks = len(fix.calls)
    monitor.notify()
    assert wait_until(lambda: len(fix.calls) == checks + 1)
    started = time.monotonic()
    checker.halt()
    assert time.monotonic() - started < 0.5 and monitor.closed


def test_failures_are_retried_every_interval_without_notifications(stop):
    monitor, fix = FakeMonitor(), Counter(fail=2)
    checker = Rechecker("t-fail", "test entries", fix, 0.2, lambda: monitor)
    checker.start(stop)
    monitor.notify()
    assert wait_until(lambda: len(fix.calls) == 3)  # two failures, then the retry that works
    time.sleep(0.5)
    assert len(fix.calls) == 3  # working again: back to waiting for notifications
    checker.halt()


def test_without_notifications_it_polls(stop, caplog):
    def refuse():
        raise PermissionError(1, "Operation not permitted")

    fix = Counter()
    checker = Rechecker("t-poll", "test entries", fix, 0.2, refuse)
    checker.start(stop)
    assert wait_until(lambda: len(fix.calls) >= 2)
    assert "no kernel change notifications for test entries" in caplog.text
    stop.set()  # the daemon's stop ends it too
    checker._thread.join(timeout=2)
    assert not checker._thread.is_alive()
    checker.halt()  # after the thread ended: nothing to wake, no error
