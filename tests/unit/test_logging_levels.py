"""-v levels: flanneld's own debug from -v 1, the libraries' debug only from -v 5, even
when a library resets its loggers' level on import (pyroute2 does)."""

import logging

import pytest

from flannel.__main__ import LIBRARY_DEBUG, _quiet_libraries, setup_logging


def record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


def test_library_debug_is_dropped_by_name_and_level_only():
    # the filter reads no logger level, which pyroute2 resets to 0 when it is imported
    assert not _quiet_libraries(record("pyroute2.netlink.core", logging.DEBUG))
    assert not _quiet_libraries(record("urllib3.connectionpool", logging.INFO))
    assert _quiet_libraries(record("pyroute2", logging.WARNING))
    assert _quiet_libraries(record("flannel.backend.vxlan", logging.DEBUG))
    assert _quiet_libraries(record("etcdctl_like_but_ours", logging.DEBUG))


@pytest.fixture
def root_handler():
    root = logging.getLogger()
    saved = root.handlers[:]
    handler = logging.StreamHandler()
    root.handlers[:] = [handler]
    yield handler
    root.handlers[:] = saved


@pytest.mark.parametrize("verbosity, filtered", [(0, True), (2, True), (LIBRARY_DEBUG, False)])
def test_the_filter_is_on_the_handler_below_the_library_level(root_handler, verbosity, filtered):
    setup_logging(verbosity)
    assert (_quiet_libraries in root_handler.filters) is filtered
