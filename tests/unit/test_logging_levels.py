"""-v levels: flanneld's own debug from -v 1, the libraries' debug only from -v 5."""

import logging

import pytest

from flannel.__main__ import LIBRARY_DEBUG, setup_logging

LIBRARIES = ("pyroute2", "urllib3", "werkzeug", "asyncio", "etcd")


@pytest.fixture
def restore_levels():
    saved = {name: logging.getLogger(name).level for name in LIBRARIES}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("verbosity, libraries_debug", [(0, False), (2, False), (LIBRARY_DEBUG, True)])
def test_library_debug_only_from_its_level(restore_levels, verbosity, libraries_debug):
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET)
    setup_logging(verbosity)
    for name in LIBRARIES:
        # WARNING: held back; NOTSET: as chatty as flanneld's own loggers (the root level)
        expected = logging.NOTSET if libraries_debug else logging.WARNING
        assert logging.getLogger(name).level == expected
