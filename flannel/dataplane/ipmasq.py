"""The iptables adapter for --ip-masq: nat POSTROUTING rules as Go flanneld installs them.

For overlay network N and our subnet S, in this order:
    -s N -d N                 RETURN       overlay -> overlay keeps its source address
    -s N ! -d 224.0.0.0/4     MASQUERADE   overlay -> outside (multicast excepted)
    ! -s N -d S               RETURN       outside -> our subnet arrives unchanged
    ! -s N -d N               MASQUERADE   host -> other hosts' subnets uses the overlay
Every rule carries the comment "flanneld masq" so it is recognisable. Set-up is idempotent:
when all rules are present nothing changes; otherwise the present ones are removed and the
whole set appended again, so their order is always right. Our rules for N that are not in the
set (left by a run that held another subnet and was killed) are removed first. Commands use `-w` to wait for the
xtables lock instead of failing when another program holds it.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import signal
import subprocess
from ipaddress import IPv4Network

from flannel.errors import BackendError

log = logging.getLogger(__name__)

TABLE = "nat"
CHAIN = "POSTROUTING"
COMMENT = "flanneld masq"
MULTICAST = "224.0.0.0/4"


def masquerade_rules(network: IPv4Network, subnet: IPv4Network) -> list:
    """The rule specifications (iptables arguments after the chain name), in order."""
    n, s = str(network), str(subnet)
    tag = ["-m", "comment", "--comment", COMMENT]
    return [
        ["-s", n, "-d", n, *tag, "-j", "RETURN"],
        ["-s", n, "!", "-d", MULTICAST, *tag, "-j", "MASQUERADE"],
        ["!", "-s", n, "-d", s, *tag, "-j", "RETURN"],
        ["!", "-s", n, "-d", n, *tag, "-j", "MASQUERADE"],
    ]


def _run(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("iptables")
    if binary is None:
        raise BackendError("--ip-masq needs the iptables command, which is not installed")
    # a session of its own: a Ctrl-C reaches the terminal's whole process group, and an
    # iptables killed by it in the middle of the stop would leave our rules behind
    return subprocess.run(
        [binary, "-w", "5", "-t", TABLE, *args], capture_output=True, text=True, timeout=30,
        start_new_session=True,
    )


def _failed(args: tuple, proc: subprocess.CompletedProcess) -> BackendError:
    if proc.returncode < 0:
        why = f"killed by {signal.Signals(-proc.returncode).name}"
    else:
        why = proc.stderr.strip() or f"exit status {proc.returncode}"
    return BackendError(f"failed to run iptables -t {TABLE} {' '.join(args)}: {why}")


def _iptables(*args: str) -> str:
    """Run iptables; its output, or a BackendError with its complaint."""
    proc = _run(*args)
    if proc.returncode != 0:
        raise _failed(args, proc)
    return proc.stdout


def _present(rule: list) -> bool:
    """Whether `rule` is in the chain. Only exit status 1 means "no such rule": anything
    else (4: the xtables lock stayed busy, say) is an error, not an absent rule, or a
    teardown would remove nothing and the next set-up add a second copy."""
    args = ("-C", CHAIN, *rule)
    proc = _run(*args)
    if proc.returncode in (0, 1):
        return proc.returncode == 0
    raise _failed(args, proc)


def _listed_rules(network: IPv4Network) -> list:
    """Our rules for `network` as the chain holds them, in order (`iptables -S` prints them
    as masquerade_rules spells them). Other networks' rules are not ours to touch."""
    n = str(network)
    listed = []
    for line in _iptables("-S", CHAIN).splitlines():
        words = shlex.split(line)
        if words[:2] != ["-A", CHAIN] or COMMENT not in words:
            continue
        rule = words[2:]
        if "-s" in rule and rule[rule.index("-s") + 1] == n:
            listed.append(rule)
    return listed


def _delete_all(rule: list) -> int:
    """Delete every copy of `rule`; returns how many were deleted."""
    count = 0
    while _present(rule):
        _iptables("-D", CHAIN, *rule)
        count += 1
    return count


def setup_masquerade(network: IPv4Network, subnet: IPv4Network) -> None:
    """Install the masquerade rules for `network` with our `subnet`; no-op when present."""
    rules = masquerade_rules(network, subnet)
    listed = _listed_rules(network)
    # e.g. the RETURN rule for the subnet held before a kill -9 and a restart with another lease
    for rule in (r for r in listed if r not in rules):
        _iptables("-D", CHAIN, *rule)
        log.info("removed a stale ip-masq rule: %s", " ".join(rule))
    if all(rule in listed for rule in rules):
        log.debug("ip-masq rules for %s already present", network)
        return
    # a partial set (an older run, someone's edit) is rebuilt so the order is right
    for rule in rules:
        _delete_all(rule)
    for rule in rules:
        _iptables("-A", CHAIN, *rule)
    log.info("added ip-masq rules for %s (subnet %s)", network, subnet)


def teardown_masquerade(network: IPv4Network, subnet: IPv4Network) -> None:
    """Remove the rules setup_masquerade installed; absent rules are not an error."""
    removed = sum(_delete_all(rule) for rule in masquerade_rules(network, subnet))
    if removed:
        log.info("removed %d ip-masq rule(s) for %s (subnet %s)", removed, network, subnet)
