"""Suite-wide rules: tests that need root or etcd skip elsewhere with a reason, but under CI
(CI=true, as .ci/run sets) a skipped test is a failure, so nothing silently goes untested."""

import os

import pytest

_skipped = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI") == "true" and _skipped and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("CI") == "true" and _skipped:
        terminalreporter.write_line(
            f"CI: {len(_skipped)} test(s) were skipped, which CI does not allow:", red=True
        )
        for nodeid in _skipped:
            terminalreporter.write_line(f"  {nodeid}", red=True)
