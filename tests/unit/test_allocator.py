"""The subnet allocator (choose_subnet) under random configs and random taken sets."""

import random
from ipaddress import IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st

from flannel.subnet.config import NetworkConfig
from flannel.subnet.local_manager import FREE_CHOICES, choose_subnet


@st.composite
def configs(draw):
    """A valid config: /12 to /28 networks, SubnetLen from prefix+1 to 30, optional bounds."""
    prefix = draw(st.integers(12, 28))
    base = draw(st.integers(0, (1 << prefix) - 1)) << (32 - prefix)
    network = IPv4Network((base, prefix))
    subnet_len = draw(st.integers(prefix + 1, min(30, prefix + 8)))
    count = 1 << (subnet_len - prefix)
    lo = draw(st.integers(1, count - 1))
    hi = draw(st.integers(lo, count - 1))
    size = 1 << (32 - subnet_len)
    doc = {"Network": str(network), "SubnetLen": subnet_len}
    if draw(st.booleans()):
        doc["SubnetMin"] = str(network.network_address + lo * size)
        doc["SubnetMax"] = str(network.network_address + hi * size)
    return NetworkConfig.parse(doc)


@settings(max_examples=150, deadline=None)
@given(configs(), st.data())
def test_choice_is_free_aligned_and_in_range(config, data):
    all_subnets = list(config.subnets())[:400]
    taken = set(data.draw(st.lists(st.sampled_from(all_subnets), max_size=len(all_subnets))))
    choice = choose_subnet(config, taken, rng=random.Random(data.draw(st.integers())))
    free = [s for s in config.subnets() if s not in taken]
    if not free:
        assert choice is None
        return
    assert choice is not None and choice not in taken
    assert config.in_range(choice)
    assert choice.prefixlen == config.subnet_len and choice.subnet_of(config.network)
    assert int(choice.network_address) % (1 << (32 - config.subnet_len)) == 0
    # random among the first free ones only
    assert choice in free[:FREE_CHOICES]


@settings(max_examples=60, deadline=None)
@given(configs(), st.integers())
def test_allocating_until_exhausted_never_overlaps(config, seed):
    rng = random.Random(seed)
    total = sum(1 for _ in config.subnets())
    if total > 300:
        return  # keep the example cheap; the property above covers large networks
    taken = []
    while True:
        choice = choose_subnet(config, taken, rng=rng)
        if choice is None:
            break
        assert all(not choice.overlaps(other) for other in taken)
        taken.append(choice)
    assert len(taken) == total


@settings(max_examples=100, deadline=None)
@given(configs(), st.data())
def test_prefer_is_used_when_in_range_and_free(config, data):
    candidates = list(config.subnets())[:200]
    prefer = data.draw(st.sampled_from(candidates))
    assert choose_subnet(config, [], prefer) == prefer
    other = choose_subnet(config, [prefer], prefer)
    assert other != prefer


def test_prefer_out_of_range_or_wrong_length_is_ignored():
    config = NetworkConfig.parse('{"Network":"10.1.0.0/16","SubnetMin":"10.1.10.0","SubnetMax":"10.1.20.0"}')
    for prefer in ("10.1.5.0/24", "10.2.10.0/24", "10.1.10.0/25"):
        choice = choose_subnet(config, [], IPv4Network(prefer), random.Random(1))
        assert choice != IPv4Network(prefer) and config.in_range(choice)


def test_first_subnet_of_the_network_is_never_chosen():
    config = NetworkConfig.parse('{"Network":"10.1.0.0/24"}')
    picks = {choose_subnet(config, [], rng=random.Random(seed)) for seed in range(50)}
    assert IPv4Network("10.1.0.0/26") not in picks
    assert picks == {IPv4Network("10.1.0.64/26"), IPv4Network("10.1.0.128/26"), IPv4Network("10.1.0.192/26")}


@st.composite
def leases_of_any_length(draw, config):
    """Subnets as other hosts may hold them: inside the Network (or straddling it), of any
    prefix length from the Network's own to /32, aligned, possibly nested in one another."""
    network = config.network
    count = draw(st.integers(0, 12))
    out = []
    for _ in range(count):
        length = draw(st.integers(max(8, network.prefixlen - 1), 32))
        offset = draw(st.integers(0, network.num_addresses - 1))
        out.append(IPv4Network((int(network.network_address) + offset, length), strict=False))
    return out


def brute_force_free(config, taken):
    return [s for s in config.subnets() if not any(s.overlaps(t) for t in taken)]


@settings(max_examples=200, deadline=None)
@given(configs(), st.data())
def test_choice_never_overlaps_leases_of_other_lengths(config, data):
    taken = data.draw(leases_of_any_length(config))
    choice = choose_subnet(config, taken, rng=random.Random(data.draw(st.integers())))
    free = brute_force_free(config, taken)
    if not free:
        assert choice is None
        return
    assert choice is not None and not any(choice.overlaps(t) for t in taken)
    assert choice in free[:FREE_CHOICES]


@settings(max_examples=150, deadline=None)
@given(configs(), st.data())
def test_prefer_is_refused_when_it_overlaps_a_lease(config, data):
    taken = data.draw(leases_of_any_length(config))
    prefer = data.draw(st.sampled_from(list(config.subnets())[:200]))
    choice = choose_subnet(config, taken, prefer, random.Random(data.draw(st.integers())))
    if any(prefer.overlaps(t) for t in taken):
        assert choice != prefer
    else:
        assert choice == prefer


def test_a_longer_lease_blocks_the_subnet_holding_it_and_a_shorter_one_all_it_covers():
    config = NetworkConfig.parse('{"Network":"10.1.0.0/16","SubnetMin":"10.1.1.0","SubnetMax":"10.1.5.0"}')
    taken = [IPv4Network("10.1.1.128/25"), IPv4Network("10.1.2.0/23"), IPv4Network("10.1.5.7/32")]
    picks = {choose_subnet(config, taken, rng=random.Random(seed)) for seed in range(30)}
    assert picks == {IPv4Network("10.1.4.0/24")}
