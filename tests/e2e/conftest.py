"""End-to-end fixtures: skip (with the reason) where the host cannot run namespaced clusters,
and attach every flanneld's log to the report of a failed test.

The clusters themselves are built by tests.support.netns.Cluster inside each module's own
class- or module-scoped fixture (named `cluster`), so that one set-up serves many tests.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.support.etcd import etcd_available
from tests.support.netns import Cluster

_TOOLS = ("ip", "bridge", "ss", "ping", "iperf3")


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_root") is not None:
        if os.geteuid() != 0:
            pytest.skip("needs root: end-to-end tests create network namespaces, veths and TUN devices")
        missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
        if missing:
            pytest.skip(f"needs {', '.join(missing)} (Debian packages iproute2, iputils-ping, iperf3)")
    if item.get_closest_marker("needs_etcd") is not None and not etcd_available():
        pytest.skip("needs the etcd binary /usr/bin/etcd (Debian package etcd-server)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        cluster = getattr(item, "funcargs", {}).get("cluster")
        if isinstance(cluster, Cluster):
            report.sections.append(("cluster logs", cluster.logs()))
    return report
