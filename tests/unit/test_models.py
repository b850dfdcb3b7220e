"""The JSON codec against values Go flanneld wrote (PROTOCOL.md), byte for byte."""

from datetime import datetime, timezone
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel.subnet.models import (
    ADDED,
    DecodeError,
    Event,
    Lease,
    LeaseAttrs,
    Reservation,
    WatchResult,
    format_time,
    parse_time,
)

GO_VALUES = [
    '{"PublicIP":"192.168.77.1"}',
    '{"PublicIP":"192.168.77.1","BackendType":"host-gw"}',
    '{"PublicIP":"192.168.77.1","BackendType":"vxlan","BackendData":{"VtepMAC":"ae:93:4e:3b:7a:1e"}}',
    # newer Go (v0.10+) writes PublicIPv6 and the VNI
    '{"PublicIP":"192.168.77.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"ae:93:4e:3b:7a:1e"}}',
    '{"PublicIP":"192.168.77.1","PublicIPv6":null,"BackendType":"udp"}',
]


@pytest.mark.parametrize("text", GO_VALUES)
def test_go_lease_values_round_trip_exactly(text):
    assert LeaseAttrs.from_json(text).to_json() == text


def test_vxlan_value_fields():
    attrs = LeaseAttrs.from_json(GO_VALUES[3])
    assert attrs.public_ip == IPv4Address("192.168.77.1")
    assert attrs.backend_type == "vxlan"
    assert attrs.backend_data == {"VNI": 1, "VtepMAC": "ae:93:4e:3b:7a:1e"}
    assert dict(attrs.extra) == {"PublicIPv6": None}


def test_our_own_values_are_what_go_writes():
    assert LeaseAttrs(IPv4Address("192.168.77.1")).to_json() == GO_VALUES[0]
    assert LeaseAttrs(IPv4Address("192.168.77.1"), "host-gw").to_json() == GO_VALUES[1]
    vxlan = LeaseAttrs(IPv4Address("192.168.77.1"), "vxlan", {"VtepMAC": "ae:93:4e:3b:7a:1e"})
    assert vxlan.to_json() == GO_VALUES[2]


def test_decoding_tolerates_case_and_unknown_fields():
    attrs = LeaseAttrs.from_json('{"publicip":"10.0.0.1","backendtype":"udp","Future":[1,2]}')
    assert attrs.public_ip == IPv4Address("10.0.0.1") and attrs.backend_type == "udp"
    assert attrs.to_json() == '{"PublicIP":"10.0.0.1","BackendType":"udp","Future":[1,2]}'


@pytest.mark.parametrize(
    "text,message",
    [
        ("{}", "PublicIP is missing"),
        ('{"PublicIP":"10.0.0.300"}', "invalid IPv4 address"),
        ('{"PublicIP":7}', "expected an IPv4 address string"),
        ('{"PublicIP":"10.0.0.1","BackendType":3}', "BackendType: expected a string"),
        ("[1]", "expected a JSON object"),
        ("not json", "invalid JSON"),
        # Python's json takes these; Go's cannot read them back
        ('{"PublicIP":"10.0.0.1","BackendData":{"x":NaN}}', "NaN is not JSON"),
        ('{"PublicIP":"10.0.0.1","BackendData":{"x":-Infinity}}', "Infinity is not JSON"),
        ('{"PublicIP":"10.0.0.1","BackendData":{"x":1e999}}', "out of range"),
        ('{"PublicIP":"10.0.0.1","BackendData":{"x":1' + "0" * 400 + "}}", "out of range"),
        # a key written to crash readers: nested deeper than the parser's stack
        ('{"PublicIP":"10.0.0.1","BackendData":' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
    ],
)
def test_bad_lease_values_are_refused(text, message):
    with pytest.raises(DecodeError, match=message):
        LeaseAttrs.from_json(text)


GO_LEASE = (
    '{"Subnet":"10.10.96.0/24","Attrs":{"PublicIP":"192.168.77.1","BackendType":"vxlan",'
    '"BackendData":{"VtepMAC":"ae:93:4e:3b:7a:1e"}},"Expiration":"2026-12-04T18:51:39.662394751Z"}'
)


def test_go_lease_from_the_http_api():
    lease = Lease.from_json(GO_LEASE)
    assert lease.subnet == IPv4Network("10.10.96.0/24")
    assert lease.attrs.backend_data == {"VtepMAC": "ae:93:4e:3b:7a:1e"}
    assert lease.expiration == datetime(2026, 12, 4, 18, 51, 39, 662394, tzinfo=timezone.utc)
    assert not lease.is_reservation
    # nanoseconds do not survive (Python keeps microseconds); everything else does
    assert lease.to_json() == GO_LEASE.replace("39.662394751Z", "39.662394Z")


def test_reservation_lease_has_go_zero_time():
    text = '{"Subnet":"10.10.5.0/24","Attrs":{"PublicIP":"192.168.77.2"},"Expiration":"0001-01-01T00:00:00Z"}'
    lease = Lease.from_json(text)
    assert lease.is_reservation and lease.expiration is None
    assert lease.to_json() == text


@pytest.mark.parametrize(
    "text,expected",
    [
        ("2026-12-04T18:51:39Z", datetime(2026, 12, 4, 18, 51, 39, tzinfo=timezone.utc)),
        ("2026-12-04T18:51:39.5Z", datetime(2026, 12, 4, 18, 51, 39, 500000, tzinfo=timezone.utc)),
        ("2026-12-04T20:51:39.000000001+02:00", datetime(2026, 12, 4, 18, 51, 39, tzinfo=timezone.utc)),
        ("0001-01-01T00:00:00Z", None),
    ],
)
def test_parse_time_any_fraction_and_offset(text, expected):
    assert parse_time(text) == expected


def test_parse_time_refuses_garbage():
    with pytest.raises(DecodeError, match="RFC 3339"):
        parse_time("yesterday")


def test_format_time_trims_trailing_zeros():
    assert format_time(datetime(2026, 1, 2, 3, 4, 5, 120000, tzinfo=timezone.utc)) == "2026-01-02T03:04:05.12Z"
    assert format_time(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)) == "2026-01-02T03:04:05Z"
    assert format_time(None) == "0001-01-01T00:00:00Z"


def test_go_removed_event_round_trips():
    doc = {"type": "removed", "lease": {"Subnet": "10.10.250.0/24", "Attrs": {"PublicIP": "0.0.0.0"},
                                        "Expiration": "0001-01-01T00:00:00Z"}}
    event = Event.from_dict(doc)
    assert event == Event.removed(IPv4Network("10.10.250.0/24"))
    assert event.to_dict() == doc


def test_event_type_is_checked():
    with pytest.raises(DecodeError, match="type must be"):
        Event.from_dict({"type": "changed"})


def test_watch_result_encodes_empty_lists_as_null():
    lease = Lease.from_json(GO_LEASE)
    snap = WatchResult(snapshot=(lease,), cursor="17")
    assert snap.to_json() == '{"events":null,"snapshot":[' + lease.to_json() + '],"cursor":"17"}'
    events = WatchResult(events=(Event(ADDED, lease),), cursor="26")
    decoded = WatchResult.from_dict(events.to_dict())
    assert decoded.events == (Event(ADDED, lease),) and decoded.snapshot is None and decoded.cursor == "26"


def test_watch_result_cursor_may_come_as_a_number():
    assert WatchResult.from_dict({"events": None, "snapshot": None, "cursor": 20}).cursor == "20"


def test_reservation_codec():
    res = Reservation.from_dict({"subnet": "10.1.2.0/24", "PublicIP": "192.168.77.9"})
    assert res == Reservation(IPv4Network("10.1.2.0/24"), IPv4Address("192.168.77.9"))
    assert res.to_dict() == {"Subnet": "10.1.2.0/24", "PublicIP": "192.168.77.9"}
    with pytest.raises(DecodeError, match="PublicIP is missing"):
        Reservation.from_dict({"Subnet": "10.1.2.0/24"})
