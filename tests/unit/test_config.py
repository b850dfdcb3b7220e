"""Every rule of the network config: defaults filled in, and each refusal names the field."""

from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel.errors import ConfigError
from flannel.subnet.config import NetworkConfig

VALID = [
    # (JSON, Network, SubnetLen, SubnetMin, SubnetMax, backend type)
    ('{"Network":"10.1.0.0/16"}', "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", "udp"),
    ('{"Network":"10.0.0.0/8"}', "10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0", "udp"),
    ('{"Network":"10.1.0.0/22"}', "10.1.0.0/22", 24, "10.1.1.0", "10.1.3.0", "udp"),
    ('{"Network":"10.1.0.0/23"}', "10.1.0.0/23", 25, "10.1.0.128", "10.1.1.128", "udp"),
    ('{"Network":"10.1.0.0/24"}', "10.1.0.0/24", 26, "10.1.0.64", "10.1.0.192", "udp"),
    ('{"Network":"10.1.0.0/28"}', "10.1.0.0/28", 30, "10.1.0.4", "10.1.0.12", "udp"),
    # Go masks host bits off the Network
    ('{"Network":"10.1.2.3/16"}', "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", "udp"),
    ('{"Network":"10.1.0.0/16","SubnetLen":20}', "10.1.0.0/16", 20, "10.1.16.0", "10.1.240.0", "udp"),
    ('{"Network":"10.1.0.0/16","SubnetLen":0}', "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", "udp"),
    # one usable subnet: the first is never handed out
    ('{"Network":"10.1.0.0/16","SubnetLen":17}', "10.1.0.0/16", 17, "10.1.128.0", "10.1.128.0", "udp"),
    ('{"Network":"10.1.0.0/16","SubnetMin":"10.1.10.0","SubnetMax":"10.1.20.0"}',
     "10.1.0.0/16", 24, "10.1.10.0", "10.1.20.0", "udp"),
    ('{"Network":"10.1.0.0/16","SubnetMin":"10.1.0.0"}', "10.1.0.0/16", 24, "10.1.0.0", "10.1.255.0", "udp"),
    ('{"Network":"10.1.0.0/16","SubnetMin":"10.1.5.0","SubnetMax":"10.1.5.0"}',
     "10.1.0.0/16", 24, "10.1.5.0", "10.1.5.0", "udp"),
    # field names in any case, as Go's encoding/json matches them
    ('{"network":"10.1.0.0/16","subnetlen":25,"BACKEND":{"type":"vxlan"}}',
     "10.1.0.0/16", 25, "10.1.0.128", "10.1.255.128", "vxlan"),
    ('{"Network":"10.1.0.0/16","Backend":{}}', "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", "udp"),
    ('{"Network":"10.1.0.0/16","Backend":{"Type":"host-gw"}}', "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", "host-gw"),
    ('{"Network":"10.1.0.0/16","Backend":{"Type":"alloc"}}', "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", "alloc"),
    ('{"Network":"10.1.0.0/16","Backend":{"Type":"udp","Port":8285}}', "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", "udp"),
    # unknown top-level fields are tolerated, like Go
    ('{"Network":"10.1.0.0/16","Comment":"x"}', "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", "udp"),
]

INVALID = [
    # (JSON, text the error must contain)
    ("", "not valid JSON"),
    ("{", "not valid JSON"),
    ('{"Network":"10.1.0.0/16","Backend":' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
    ('{"Network":"10.1.0.0/16","SubnetLen":NaN}', "NaN is not JSON"),
    ('["10.1.0.0/16"]', "must be a JSON object"),
    ("{}", "Network is missing"),
    ('{"Network":""}', "Network is missing"),
    ('{"Network":16}', "Network must be a string"),
    ('{"Network":"10.1.0.0"}', "too small"),  # a bare address is a /32
    ('{"Network":"fd00::/64"}', "is IPv6"),
    ('{"Network":"10.1.0.0/33"}', "not a valid IPv4 CIDR"),
    ('{"Network":"banana"}', "not a valid IPv4 CIDR"),
    ('{"Network":"10.1.0.0/29"}', "too small"),
    ('{"Network":"10.1.0.0/16","SubnetLen":31}', "SubnetLen 31 is too long"),
    ('{"Network":"10.1.0.0/16","SubnetLen":8}', "SubnetLen 8 is shorter than the Network prefix /16"),
    ('{"Network":"10.1.0.0/16","SubnetLen":16}', "SubnetLen 16 leaves no usable subnet"),
    ('{"Network":"10.1.0.0/16","SubnetLen":"24"}', "SubnetLen must be an integer"),
    ('{"Network":"10.1.0.0/16","SubnetLen":true}', "SubnetLen must be an integer"),
    ('{"Network":"10.1.0.0/16","SubnetMin":"10.2.0.0"}', "SubnetMin 10.2.0.0 is not in the range of the Network"),
    ('{"Network":"10.1.0.0/16","SubnetMax":"10.2.0.0"}', "SubnetMax 10.2.0.0 is not in the range of the Network"),
    ('{"Network":"10.1.0.0/16","SubnetMin":"10.1.1.5"}', "SubnetMin 10.1.1.5 is not on a SubnetLen (/24) boundary"),
    ('{"Network":"10.1.0.0/16","SubnetMax":"10.1.1.128"}', "SubnetMax 10.1.1.128 is not on a SubnetLen (/24) boundary"),
    ('{"Network":"10.1.0.0/16","SubnetMin":"banana"}', "SubnetMin 'banana' is not a valid IPv4 address"),
    ('{"Network":"10.1.0.0/16","SubnetMin":5}', "SubnetMin must be an IPv4 address string"),
    ('{"Network":"10.1.0.0/16","SubnetMin":"10.1.20.0","SubnetMax":"10.1.10.0"}',
     "SubnetMin 10.1.20.0 is greater than SubnetMax 10.1.10.0"),
    ('{"Network":"10.1.0.0/16","Backend":"vxlan"}', "Backend must be a JSON object"),
    ('{"Network":"10.1.0.0/16","Backend":["vxlan"]}', "Backend must be a JSON object"),
    ('{"Network":"10.1.0.0/16","Backend":{"Type":"gre"}}', "Backend Type 'gre' is unknown"),
    ('{"Network":"10.1.0.0/16","Backend":{"Type":7}}', "Backend Type 7 is unknown"),
]


@pytest.mark.parametrize("text,network,length,smin,smax,btype", VALID)
def test_valid_configs_get_go_defaults(text, network, length, smin, smax, btype):
    config = NetworkConfig.parse(text)
    assert config.network == IPv4Network(network)
    assert config.subnet_len == length
    assert config.subnet_min == IPv4Address(smin)
    assert config.subnet_max == IPv4Address(smax)
    assert config.backend_type == btype


@pytest.mark.parametrize("text,message", INVALID)
def test_invalid_configs_are_refused_with_the_rule(text, message):
    with pytest.raises(ConfigError) as info:
        NetworkConfig.parse(text)
    assert message in str(info.value)


def test_to_dict_is_what_the_go_server_returns():
    config = NetworkConfig.parse('{"Network":"10.10.0.0/16","Backend":{"Type":"vxlan"}}')
    assert config.to_dict() == {
        "Network": "10.10.0.0/16",
        "SubnetMin": "10.10.1.0",
        "SubnetMax": "10.10.255.0",
        "SubnetLen": 24,
        "Backend": {"Type": "vxlan"},
    }


def test_in_range_and_subnets():
    config = NetworkConfig.parse('{"Network":"10.1.0.0/16","SubnetMin":"10.1.10.0","SubnetMax":"10.1.12.0"}')
    assert [str(s) for s in config.subnets()] == ["10.1.10.0/24", "10.1.11.0/24", "10.1.12.0/24"]
    assert config.in_range(IPv4Network("10.1.11.0/24"))
    assert not config.in_range(IPv4Network("10.1.9.0/24"))
    assert not config.in_range(IPv4Network("10.1.13.0/24"))
    assert not config.in_range(IPv4Network("10.1.10.0/25"))  # wrong SubnetLen


def test_backend_option_matches_case_insensitively():
    config = NetworkConfig.parse('{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","vni":7}}')
    assert config.backend_option("VNI") == 7
    assert config.backend_option("Port", 8472) == 8472


def test_parse_accepts_a_decoded_dict_and_bytes():
    assert NetworkConfig.parse({"Network": "10.1.0.0/16"}).subnet_len == 24
    assert NetworkConfig.parse(b'{"Network":"10.1.0.0/16"}').subnet_len == 24
