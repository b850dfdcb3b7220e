"""subnet.env: Go flanneld's exact format, atomic replacement, mode 0644, read back."""

import os
import stat
import threading
from ipaddress import IPv4Network

from flannel.network.subnet_env import (
    SubnetEnv, parse_subnet_env, read_subnet, remove_subnet_env, write_subnet_env,
)

ENV = SubnetEnv(IPv4Network("10.10.0.0/16"), IPv4Network("10.10.96.0/24"), 1472, False)


def test_format_is_exactly_go_flanneld(tmp_path):
    path = tmp_path / "run" / "flannel" / "subnet.env"  # directories are created
    write_subnet_env(path, ENV)
    assert path.read_text() == (
        "FLANNEL_NETWORK=10.10.0.0/16\n"
        "FLANNEL_SUBNET=10.10.96.1/24\n"
        "FLANNEL_MTU=1472\n"
        "FLANNEL_IPMASQ=false\n"
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_ipmasq_true_and_mode_despite_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_subnet_env(tmp_path / "a.env", SubnetEnv(ENV.network, ENV.subnet, 65536, True))
    finally:
        os.umask(old)
    path = tmp_path / "a.env"
    assert "FLANNEL_IPMASQ=true\n" in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_replacement_is_atomic_and_leaves_no_temp_files(tmp_path):
    """A reader polling while the file is rewritten sees either the old or the new content."""
    path = tmp_path / "subnet.env"
    other = SubnetEnv(IPv4Network("10.10.0.0/16"), IPv4Network("10.10.7.0/24"), 1450, True)
    write_subnet_env(path, ENV)
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(path.read_text())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(300):
            write_subnet_env(path, other if i % 2 else ENV)
    finally:
        stop.set()
        thread.join()
    assert seen <= {ENV.render(), other.render()}
    assert len(seen) >= 1
    assert [p.name for p in tmp_path.iterdir()] == ["subnet.env"]


def test_read_subnet_back(tmp_path):
    path = tmp_path / "subnet.env"
    assert read_subnet(path) is None
    write_subnet_env(path, ENV)
    assert read_subnet(path) == IPv4Network("10.10.96.0/24")
    path.write_text("FLANNEL_SUBNET=bogus\n")
    assert read_subnet(path) is None
    path.write_text("# hand edited\nFLANNEL_SUBNET=10.5.3.1/26\n")
    assert read_subnet(path) == IPv4Network("10.5.3.0/26")
    remove_subnet_env(path)
    remove_subnet_env(path)  # idempotent
    assert not path.exists()


def test_parse_subnet_env():
    assert parse_subnet_env(ENV.render()) == {
        "FLANNEL_NETWORK": "10.10.0.0/16", "FLANNEL_SUBNET": "10.10.96.1/24",
        "FLANNEL_MTU": "1472", "FLANNEL_IPMASQ": "false",
    }
