"""The netlink adapter turns every failure that escapes a pyroute2 session (a refused dump,
ENOBUFS on a large table, no socket) into a BackendError, so that the callers that retry or
log backend failures never die of a raw pyroute2 or OS error. Real kernel behaviour is in
tests/integration/test_netlink.py; here pyroute2 is replaced by a fake that fails."""

import errno

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from flannel.backend.peers import Rechecker
from flannel.dataplane import netlink
from flannel.errors import BackendError


class FailingIPRoute:
    closed = 0

    def __init__(self, fail):
        self.fail = fail

    def route(self, *args, **kwargs):
        raise self.fail

    get_neighbours = fdb = get_addr = route

    def close(self):
        FailingIPRoute.closed += 1


@pytest.mark.parametrize("fail, text", [
    (NetlinkError(errno.EPERM, "Operation not permitted"), "Operation not permitted"),
    (OSError(errno.ENOBUFS, "No buffer space available"), "No buffer space available"),
])
def test_failed_dumps_are_backend_errors_and_close_the_session(monkeypatch, fail, text):
    monkeypatch.setattr(netlink, "IPRoute", lambda: FailingIPRoute(fail))
    before = FailingIPRoute.closed
    for call in (netlink.list_routes, lambda: netlink.list_neighbours(3),
                 lambda: netlink.list_fdb(3), lambda: netlink.read_state(3)):
        with pytest.raises(BackendError, match=text):
            call()
    assert FailingIPRoute.closed - before == 4


def test_no_netlink_socket_is_a_backend_error(monkeypatch):
    def refuse():
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(netlink, "IPRoute", refuse)
    with pytest.raises(BackendError, match="netlink socket: .*Too many open files"):
        netlink.list_routes()


def test_a_recheck_that_hits_a_bug_is_retried_not_ended(caplog):
    calls = []

    def fix():
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug")
        return 0

    checker = Rechecker("recheck-test", "peer routes", fix, interval=1.0)
    assert checker._check(False) is True  # failed: logged, to be retried
    assert "restoring peer routes failed" in caplog.text
    assert checker._check(True) is False  # the next check works
