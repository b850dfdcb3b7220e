"""packaging/mk-docker-opts.sh on sample subnet files: the docker options it writes for each of
-d -k -c -m -i, in the exact format of Go flannel's script (docker.service drop-ins source it)."""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "packaging" / "mk-docker-opts.sh"

SUBNET_ENV = """\
FLANNEL_NETWORK=10.10.0.0/16
FLANNEL_SUBNET=10.10.23.1/24
FLANNEL_MTU=1472
FLANNEL_IPMASQ=true
"""
INDIVIDUAL = (
    'DOCKER_OPT_BIP="--bip=10.10.23.1/24"\n'
    'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
    'DOCKER_OPT_MTU="--mtu=1472"\n'
)
COMBINED = 'DOCKER_OPTS=" --bip=10.10.23.1/24 --ip-masq=false --mtu=1472"\n'


def run(tmp_path, *args, subnet=SUBNET_ENV, env=None, out="docker_opts.env"):
    """Run the script on `subnet`; returns (completed process, text written or None)."""
    subnet_file = tmp_path / "subnet.env"
    subnet_file.write_text(subnet)
    target = tmp_path / out
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})}
    proc = subprocess.run(
        ["bash", str(SCRIPT), "-f", str(subnet_file), "-d", str(target), *args],
        capture_output=True, text=True, env=environ, timeout=30,
    )
    return proc, (target.read_text() if target.exists() else None)


def test_default_writes_individual_and_combined(tmp_path):
    proc, text = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert text == INDIVIDUAL + COMBINED


def test_c_writes_only_the_combined_variable(tmp_path):
    proc, text = run(tmp_path, "-c")
    assert proc.returncode == 0, proc.stderr
    assert text == COMBINED


def test_i_writes_only_individual_variables(tmp_path):
    proc, text = run(tmp_path, "-i")
    assert proc.returncode == 0, proc.stderr
    assert text == INDIVIDUAL


def test_k_names_the_combined_variable_as_the_unit_file_uses_it(tmp_path):
    proc, text = run(tmp_path, "-k", "DOCKER_NETWORK_OPTIONS", "-c")
    assert proc.returncode == 0, proc.stderr
    assert text == COMBINED.replace("DOCKER_OPTS=", "DOCKER_NETWORK_OPTIONS=")


def test_k_keeps_the_variables_value_from_the_environment_in_front(tmp_path):
    proc, text = run(tmp_path, "-c", "-k", "EXTRA", env={"EXTRA": "--debug"})
    assert proc.returncode == 0, proc.stderr
    assert text == 'EXTRA="--debug  --bip=10.10.23.1/24 --ip-masq=false --mtu=1472"\n'


def test_m_leaves_out_ip_masq(tmp_path):
    proc, text = run(tmp_path, "-m")
    assert proc.returncode == 0, proc.stderr
    assert text == (
        'DOCKER_OPT_BIP="--bip=10.10.23.1/24"\n'
        'DOCKER_OPT_MTU="--mtu=1472"\n'
        'DOCKER_OPTS=" --bip=10.10.23.1/24 --mtu=1472"\n'
    )


def test_flannel_without_ipmasq_lets_docker_masquerade(tmp_path):
    proc, text = run(tmp_path, "-c", subnet=SUBNET_ENV.replace("IPMASQ=true", "IPMASQ=false"))
    assert proc.returncode == 0, proc.stderr
    assert "--ip-masq=true" in text


def test_only_the_values_present_are_written(tmp_path):
    proc, text = run(tmp_path, "-i", subnet="FLANNEL_SUBNET=10.10.5.1/24\n")
    assert proc.returncode == 0, proc.stderr
    assert text == 'DOCKER_OPT_BIP="--bip=10.10.5.1/24"\n'


def test_d_creates_the_directory_and_leaves_no_temp_file(tmp_path):
    proc, text = run(tmp_path, "-c", out="run/flannel/docker")
    assert proc.returncode == 0, proc.stderr
    assert text == COMBINED
    assert os.listdir(tmp_path / "run" / "flannel") == ["docker"]
    assert (tmp_path / "run" / "flannel" / "docker").stat().st_mode & 0o777 == 0o644


def test_output_sources_back_to_the_same_values(tmp_path):
    proc, text = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    shown = subprocess.run(
        ["bash", "-c", f'. "{tmp_path}/docker_opts.env"; printf "%s|%s" "$DOCKER_OPT_MTU" "$DOCKER_OPTS"'],
        capture_output=True, text=True, check=True,
    ).stdout
    assert shown == "--mtu=1472| --bip=10.10.23.1/24 --ip-masq=false --mtu=1472"


def test_subnet_file_is_parsed_not_executed(tmp_path):
    marker = tmp_path / "ran"
    proc, text = run(tmp_path, "-c", subnet=SUBNET_ENV + f"touch {marker}\nFOO=$(touch {marker})\n")
    assert proc.returncode == 0, proc.stderr
    assert text == COMBINED
    assert not marker.exists()


@pytest.mark.parametrize(
    "args, subnet, message",
    [
        ((), SUBNET_ENV.replace("IPMASQ=true", "IPMASQ=maybe"), "invalid FLANNEL_IPMASQ=maybe"),
        (("-k", "BAD-NAME"), SUBNET_ENV, "-k BAD-NAME is not a valid variable name"),
        (("-x",), SUBNET_ENV, "usage:"),
    ],
)
def test_bad_input_fails_without_writing(tmp_path, args, subnet, message):
    proc, text = run(tmp_path, *args, subnet=subnet)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert text is None


def test_missing_subnet_file_is_an_error_naming_it(tmp_path):
    target = tmp_path / "out.env"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "-f", str(tmp_path / "nope.env"), "-d", str(target)],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 1
    assert f"cannot read flannel subnet file {tmp_path}/nope.env" in proc.stderr
    assert not target.exists()
