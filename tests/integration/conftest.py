"""Integration fixtures: one real etcd per test module, a fresh key prefix per test."""

import itertools
import os

import pytest

from tests.support.etcd import EtcdServer, etcd_available

_counter = itertools.count()


def _require_etcd():
    if not etcd_available():
        pytest.skip("needs the etcd binary /usr/bin/etcd (Debian package etcd-server)")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    """A running etcd (v2 API) on free loopback ports, stopped after the module."""
    _require_etcd()
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefix(request):
    """A key prefix nobody else uses, so tests sharing one etcd never see each other's keys."""
    name = request.node.name.translate({ord(c): "_" for c in "[]/ -:"})[:40]
    return f"/test/{os.getpid()}-{next(_counter)}-{name}/network"
