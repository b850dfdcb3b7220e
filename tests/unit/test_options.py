"""Option parsing: Go and GNU flag syntax, FLANNELD_* environment, options.env files,
precedence, and errors that name the key and its source."""

import subprocess
import sys
from pathlib import Path

import pytest

from flannel.errors import OptionsError
from flannel.options import FLAGS, go_to_gnu, help_text, parse_options

REPO = Path(__file__).resolve().parents[2]
NO_FILE = "/nonexistent/options.env"


def parse(argv=(), env=None, default_file=NO_FILE):
    return parse_options(list(argv), env=env or {}, default_config_file=default_file)


def test_defaults_are_go_flanneld_defaults():
    opts = parse()
    assert opts.etcd_endpoints == ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
    assert opts.etcd_prefix == "/coreos.com/network"
    assert opts.subnet_file == "/run/flannel/subnet.env"
    assert opts.subnet_dir == "/run/flannel/networks"
    assert opts.subnet_lease_renew_margin == 60
    assert opts.ip_masq is False and opts.watch_networks is False
    assert opts.networks == [] and opts.listen is None and opts.remote is None
    assert opts.iface is None and opts.public_ip is None and opts.verbose == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["-etcd-endpoints=http://10.0.0.1:2379", "-ip-masq", "-subnet-lease-renew-margin=30"],
        ["--etcd-endpoints", "http://10.0.0.1:2379", "--ip-masq", "--subnet-lease-renew-margin", "30"],
        ["-etcd-endpoints", "http://10.0.0.1:2379", "--ip-masq=true", "-subnet-lease-renew-margin", "30"],
        ["--etcd-endpoints=http://10.0.0.1:2379", "-ip-masq=1", "--subnet-lease-renew-margin=30"],
    ],
)
def test_go_and_gnu_syntax_mean_the_same(argv):
    opts = parse(argv)
    assert opts.etcd_endpoints == ["http://10.0.0.1:2379"]
    assert opts.ip_masq is True
    assert opts.subnet_lease_renew_margin == 30


@pytest.mark.parametrize("value", ["false", "0", "f", "FALSE", "False"])
def test_boolean_false_values(value):
    assert parse([f"--ip-masq={value}"]).ip_masq is False
    assert parse([f"-watch-networks={value}"]).watch_networks is False


def test_go_to_gnu_leaves_values_and_unknown_single_dash_alone():
    argv = ["-iface=eth0", "-v", "-x", "--public-ip", "-etcd-prefix", "--", "-iface"]
    assert go_to_gnu(argv) == ["--iface=eth0", "-v", "-x", "--public-ip", "--etcd-prefix", "--", "-iface"]


@pytest.mark.parametrize("argv, level", [([], 0), (["-v"], 1), (["-vv"], 2), (["-v=3"], 3), (["--verbose=2"], 2),
                                         (["--v=2"], 2), (["--v", "4"], 4)])
def test_verbosity(argv, level):
    assert parse(argv).verbose == level


def test_every_flag_has_an_environment_variable():
    env = {
        "FLANNELD_ETCD_ENDPOINTS": "https://10.0.0.1:2379,https://10.0.0.2:2379",
        "FLANNELD_ETCD_PREFIX": "/my/net",
        "FLANNELD_IFACE": "eth1",
        "FLANNELD_PUBLIC_IP": "192.168.77.5",
        "FLANNELD_IP_MASQ": "true",
        "FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "15",
        "FLANNELD_NETWORKS": "blue,red",
        "FLANNELD_WATCH_NETWORKS": "1",
        "FLANNELD_SUBNET_DIR": "/tmp/nets",
        "FLANNELD_REMOTE": "10.0.0.3:8888",
    }
    opts = parse(env=env)
    assert opts.etcd_endpoints == ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
    assert opts.etcd_prefix == "/my/net" and opts.iface == "eth1"
    assert opts.public_ip == "192.168.77.5" and opts.ip_masq is True
    assert opts.subnet_lease_renew_margin == 15 and opts.networks == ["blue", "red"]
    assert opts.watch_networks is True and opts.subnet_dir == "/tmp/nets"
    assert opts.remote == "10.0.0.3:8888"


def test_precedence_cli_over_env_over_file_over_default(tmp_path):
    conf = tmp_path / "options.env"
    conf.write_text(
        "# comment\n\n"
        "FLANNELD_IFACE=from-file\n"
        "FLANNELD_ETCD_PREFIX=\"/from/file\"\n"
        "FLANNELD_SUBNET_DIR='/file/dir'\n"
        "FLANNELD_IP_MASQ=true\n"
        "FLANNELD_SUBNET_LEASE_RENEW_MARGIN=10\n"
    )
    env = {"FLANNELD_IFACE": "from-env", "FLANNELD_ETCD_PREFIX": "/from/env", "FLANNELD_IP_MASQ": "false"}
    opts = parse(["--iface=from-cli", f"--config-file={conf}"], env=env)
    assert opts.iface == "from-cli"  # cli > env > file
    assert opts.etcd_prefix == "/from/env"  # env > file
    assert opts.ip_masq is False  # env false beats file true
    assert opts.subnet_dir == "/file/dir"  # file > default, quotes removed
    assert opts.subnet_lease_renew_margin == 10
    assert opts.subnet_file == "/run/flannel/subnet.env"  # default


def test_cli_false_beats_env_true():
    assert parse(["-ip-masq=false"], env={"FLANNELD_IP_MASQ": "true"}).ip_masq is False


def test_default_options_file_is_read_when_present_and_optional(tmp_path):
    default = tmp_path / "options.env"
    assert parse(default_file=str(default)).iface is None  # absent: fine
    default.write_text("export FLANNELD_IFACE=eth9\n")
    assert parse(default_file=str(default)).iface == "eth9"
    other = tmp_path / "other.env"
    other.write_text("FLANNELD_PUBLIC_IP=10.9.9.9\n")
    opts = parse(["--config-file", str(other)], default_file=str(default))
    assert opts.public_ip == "10.9.9.9" and opts.iface is None  # the named file replaces the default


def test_options_file_from_the_environment_and_dev_null(tmp_path):
    default = tmp_path / "options.env"
    default.write_text("FLANNELD_IFACE=eth9\n")
    other = tmp_path / "other.env"
    other.write_text("FLANNELD_PUBLIC_IP=10.9.9.9\n")
    opts = parse(env={"FLANNELD_CONFIG_FILE": str(other)}, default_file=str(default))
    assert opts.public_ip == "10.9.9.9" and opts.iface is None
    # the command line beats the environment; /dev/null reads no file at all
    opts = parse(["--config-file=/dev/null"], env={"FLANNELD_CONFIG_FILE": str(other)},
                 default_file=str(default))
    assert opts.public_ip is None and opts.iface is None


def test_unknown_environment_variables_are_ignored_with_a_warning():
    opts = parse(env={"FLANNELD_BOGUS": "1", "FLANNELD_IFACE": "eth1", "OTHER": "x"})
    assert opts.iface == "eth1"
    assert opts.warnings == ["environment variable FLANNELD_BOGUS is not a flanneld option; ignored"]


@pytest.mark.parametrize(
    "argv, env, text, expected",
    [
        (["--subnet-lease-renew-margin=0"], {}, None, ["command line", "--subnet-lease-renew-margin", "1 to 1439"]),
        (["-subnet-lease-renew-margin=1440"], {}, None, ["command line", "1 to 1439", "1440"]),
        (["--subnet-lease-renew-margin=abc"], {}, None, ["command line", "minutes", "abc"]),
        ([], {"FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "2000"}, None,
         ["environment variable FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "1 to 1439"]),
        ([], {"FLANNELD_IP_MASQ": "maybe"}, None, ["environment variable FLANNELD_IP_MASQ", "true or false"]),
        ([], {"FLANNELD_PUBLIC_IP": "10.0.0.300"}, None, ["FLANNELD_PUBLIC_IP", "IPv4"]),
        ([], {"FLANNELD_ETCD_ENDPOINTS": "127.0.0.1:2379"}, None, ["FLANNELD_ETCD_ENDPOINTS", "http://"]),
        ([], {}, "FLANNELD_BOGUS=1\n", ["options.env:1", "unknown key FLANNELD_BOGUS"]),
        ([], {}, "# x\nFLANNELD_IFACE=eth0\nFLANNELD_IP_MASQ=perhaps\n",
         ["FLANNELD_IP_MASQ in", "options.env:3", "true or false"]),
        ([], {}, "just garbage\n", ["options.env:1", "FLANNELD_<NAME>=value"]),
        ([], {}, "FLANNELD_NETWORKS=ok,no/slash\n", ["FLANNELD_NETWORKS", "no/slash"]),
        (["--no-such-flag"], {}, None, ["command line", "--no-such-flag"]),
        (["--public-ip=fe80::1"], {}, None, ["command line", "--public-ip", "IPv4"]),
        (["--remote=nohost"], {}, None, ["command line", "--remote", "HOST:PORT"]),
        (["--listen=fd://x"], {}, None, ["command line", "--listen", "fd://N"]),
        (["--listen=unix:///run/flannel.sock"], {}, None,
         ["command line", "--listen", "scheme unix://", "'unix:///run/flannel.sock'", "tcp://HOST:PORT"]),
        (["--listen=tcp://10.0.0.3"], {}, None, ["--listen", "'tcp://10.0.0.3'", "HOST:PORT"]),
        (["--etcd-cafile=/no/such/ca.pem"], {}, None, ["--etcd-cafile", "/no/such/ca.pem", "readable"]),
        (["--listen=:8888", "--remote=10.0.0.1:8888"], {}, None, ["--listen and --remote"]),
        (["-kube-subnet-mgr"], {}, None, ["--kube-subnet-mgr", "not supported"]),
        (["--config-file=/no/such/file.env"], {}, None, ["--config-file", "/no/such/file.env", "no such file"]),
        (["--config-file=/tmp"], {}, None, ["--config-file", "/tmp", "is a directory"]),
        ([], {"FLANNELD_CONFIG_FILE": "/no/such/file.env"}, None,
         ["environment variable FLANNELD_CONFIG_FILE", "/no/such/file.env", "no such file"]),
    ],
)
def test_errors_name_key_and_source(tmp_path, argv, env, text, expected):
    if text is not None:
        conf = tmp_path / "options.env"
        conf.write_text(text)
        argv = argv + ["--config-file", str(conf)]
    with pytest.raises(OptionsError) as err:
        parse(argv, env=env)
    for fragment in expected:
        assert fragment in str(err.value)


def test_margin_bounds_accepted():
    assert parse(["--subnet-lease-renew-margin=1"]).subnet_lease_renew_margin == 1
    assert parse(["--subnet-lease-renew-margin=1439"]).subnet_lease_renew_margin == 1439


def test_listen_forms():
    assert parse(["--listen=fd://"]).listen == "fd://"
    assert parse(["-listen=fd://5"]).listen == "fd://5"
    assert parse(["--listen", ":8888"]).listen == ":8888"
    # Go's server takes an optional tcp:// in front of HOST:PORT
    assert parse(["--listen=tcp://10.0.0.3:8888"]).listen == "tcp://10.0.0.3:8888"
    assert parse(["-listen=tcp://:8888"]).listen == "tcp://:8888"


def test_help_explains_every_flag():
    text = help_text()
    for flag in FLAGS:
        assert f"--{flag.name}" in text
    for needle in ("FLANNELD_", "options.env", "Exit status", "/coreos.com/network", "1 to 1439"):
        assert needle in text


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "flannel", *args], capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_process_exit_status_2_on_bad_options():
    done = _run("--subnet-lease-renew-margin=0")
    assert done.returncode == 2
    assert "--subnet-lease-renew-margin" in done.stderr
    done = _run(env={"FLANNELD_IP_MASQ": "sometimes"})
    assert done.returncode == 2 and "FLANNELD_IP_MASQ" in done.stderr


def test_process_help_and_version():
    done = _run("-help")
    assert done.returncode == 0 and "--etcd-endpoints" in done.stdout
    done = _run("--version")
    assert done.returncode == 0 and done.stdout.startswith("flanneld ")
