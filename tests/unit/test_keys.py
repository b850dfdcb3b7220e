"""The etcd key schema: formatting and parsing of subnet, config and network keys."""

from ipaddress import IPv4Network

import pytest

from flannel.subnet import keys


def test_subnet_key_round_trip():
    subnet = IPv4Network("10.1.34.0/24")
    assert keys.subnet_to_key(subnet) == "10.1.34.0-24"
    assert keys.key_to_subnet("10.1.34.0-24") == subnet
    assert keys.key_to_subnet("/coreos.com/network/subnets/10.1.34.0-24") == subnet


@pytest.mark.parametrize(
    "name",
    ["10.1.34.1-24", "10.1.34.0-33", "10.1.34.0", "10.1.34.0-", "banana", "", "256.1.1.0-24",
     "10.1.34.0-24x", "/coreos.com/network/subnets", "10.1.34.0_24"],
)
def test_key_to_subnet_refuses_non_subnet_keys(name):
    assert keys.key_to_subnet(name) is None


def test_single_network_keys():
    prefix = "/coreos.com/network"
    assert keys.config_key(prefix) == "/coreos.com/network/config"
    assert keys.subnets_dir(prefix) == "/coreos.com/network/subnets"
    assert keys.subnet_key(prefix, "", IPv4Network("10.10.96.0/24")) == "/coreos.com/network/subnets/10.10.96.0-24"


def test_multi_network_keys():
    prefix = "/coreos.com/network"
    assert keys.config_key(prefix, "blue") == "/coreos.com/network/blue/config"
    assert keys.subnet_key(prefix, "blue", IPv4Network("10.2.3.0/24")) == "/coreos.com/network/blue/subnets/10.2.3.0-24"


@pytest.mark.parametrize("prefix", ["/coreos.com/network", "/coreos.com/network/", "coreos.com/network"])
def test_prefix_is_normalised(prefix):
    assert keys.normalize_prefix(prefix) == "/coreos.com/network"
    assert keys.config_key(prefix) == "/coreos.com/network/config"


@pytest.mark.parametrize(
    "key,network",
    [
        ("/coreos.com/network/blue/config", "blue"),
        ("/coreos.com/network/net-2.a_b/config", "net-2.a_b"),
        ("/coreos.com/network/config", None),
        ("/coreos.com/network/blue/subnets/10.1.2.0-24", None),
        ("/coreos.com/network/a/b/config", None),
        ("/other/blue/config", None),
        ("/coreos.com/network/subnets/config", None),
    ],
)
def test_network_of_config_key(key, network):
    assert keys.network_of_config_key("/coreos.com/network", key) == network


@pytest.mark.parametrize("name,ok", [("blue", True), ("a.b-c_1", True), ("_", False), ("config", False),
                                     ("subnets", False), ("", False), ("a/b", False), ("-x", False)])
def test_network_names(name, ok):
    assert keys.is_valid_network_name(name) is ok
