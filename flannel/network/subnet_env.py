"""The subnet file (subnet.env / <network>.env): written atomically, read back at start.

The format is exactly Go flanneld's, one `NAME=value` line each, because docker's and
other services' unit files source it:

    FLANNEL_NETWORK=10.10.0.0/16
    FLANNEL_SUBNET=10.10.96.1/24
    FLANNEL_MTU=1472
    FLANNEL_IPMASQ=false
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

FILE_MODE = 0o644


@dataclass(frozen=True)
class SubnetEnv:
    network: IPv4Network
    subnet: IPv4Network  # the lease's subnet (the file holds its first address)
    mtu: int
    ipmasq: bool

    def render(self) -> str:
        first = IPv4Interface((int(self.subnet.network_address) + 1, self.subnet.prefixlen))
        return (
            f"FLANNEL_NETWORK={self.network}\n"
            f"FLANNEL_SUBNET={first}\n"
            f"FLANNEL_MTU={self.mtu}\n"
            f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}\n"
        )


def write_subnet_env(path: Path | str, env: SubnetEnv) -> None:
    """Replace `path` atomically (temp file in the same directory, fsync, rename), mode 0644;
    the directory is created when missing. A reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(env.render())
            out.flush()
            os.fchmod(out.fileno(), FILE_MODE)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def parse_subnet_env(text: str) -> dict:
    """NAME=value lines -> dict (comments and blank lines skipped)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def read_subnet(path: Path | str) -> Optional[IPv4Network]:
    """The lease subnet recorded in an existing subnet file, or None (no file, or a file that
    does not hold a valid FLANNEL_SUBNET; the latter is logged)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the previous subnet file %s: %s", path, exc)
        return None
    value = parse_subnet_env(text).get("FLANNEL_SUBNET")
    try:
        return IPv4Interface(value).network if value else None
    except ValueError:
        log.warning("ignoring %s: FLANNEL_SUBNET=%s is not an IPv4 address/prefix", path, value)
        return None


def remove_subnet_env(path: Path | str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
