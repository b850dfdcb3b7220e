"""iptables' exit status as the masquerade adapter reads it: for `-C` only 1 means "no such
rule"; any other failure (4: the xtables lock stayed busy) is an error, never "absent", or a
teardown would remove nothing and the next set-up append a second copy. The rules in a real
nat table are tested in tests/integration/test_ipmasq.py."""

import subprocess
from ipaddress import IPv4Network

import pytest

from flannel.dataplane import ipmasq
from flannel.errors import BackendError


def _answering(returncode: int, stderr: str = ""):
    calls = []

    def run(*args):
        calls.append(args)
        return subprocess.CompletedProcess(args, returncode, "", stderr)

    return run, calls


def test_only_status_1_means_absent(monkeypatch):
    run, _calls = _answering(1)
    monkeypatch.setattr(ipmasq, "_run", run)
    assert ipmasq._present(["-s", "10.10.0.0/16", "-j", "RETURN"]) is False
    run, _calls = _answering(0)
    monkeypatch.setattr(ipmasq, "_run", run)
    assert ipmasq._present(["-s", "10.10.0.0/16", "-j", "RETURN"]) is True


def test_a_busy_lock_is_an_error_and_teardown_deletes_nothing_blindly(monkeypatch):
    run, calls = _answering(4, "Another app is currently holding the xtables lock")
    monkeypatch.setattr(ipmasq, "_run", run)
    with pytest.raises(BackendError, match="xtables lock"):
        ipmasq.teardown_masquerade(IPv4Network("10.10.0.0/16"), IPv4Network("10.10.5.0/24"))
    assert [c[0] for c in calls] == ["-C"]  # it stopped at the first unanswerable question


def test_a_killed_or_silent_iptables_is_named_as_such(monkeypatch):
    for code, text in ((-2, "killed by SIGINT"), (3, "exit status 3")):
        run, _calls = _answering(code)
        monkeypatch.setattr(ipmasq, "_run", run)
        with pytest.raises(BackendError, match=text):
            ipmasq._present(["-j", "RETURN"])


def test_iptables_runs_in_a_session_of_its_own(monkeypatch):
    """So that the Ctrl-C sent to flanneld's process group does not kill it mid-teardown."""
    seen = {}

    def fake_run(argv, **kwargs):
        seen.update(kwargs)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(ipmasq.shutil, "which", lambda name: "/usr/sbin/iptables")
    monkeypatch.setattr(ipmasq.subprocess, "run", fake_run)
    assert ipmasq._present(["-j", "RETURN"]) is True
    assert seen.get("start_new_session") is True
