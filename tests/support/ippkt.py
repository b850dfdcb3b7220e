"""Build and parse raw IPv4 packets for data-path tests (ICMP echo, UDP, ICMP errors).

Independent of the C code it checks: headers are packed with `struct` and checksums are
computed from scratch here, so a wrong incremental update in the proxy shows up.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

ICMP, UDP = 1, 17
_HDR = struct.Struct("!BBHHHBBH4s4s")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64, ident: int = 1,
         frag_offset: int = 0, more_fragments: bool = False, dont_fragment: bool = False) -> bytes:
    """An IPv4 packet with a correct header checksum."""
    flags = (0x4000 if dont_fragment else 0) | (0x2000 if more_fragments else 0)
    fields = [0x45, 0, 20 + len(payload), ident, flags | frag_offset, ttl, proto, 0,
              IPv4Address(src).packed, IPv4Address(dst).packed]
    header = _HDR.pack(*fields)
    fields[7] = checksum(header)
    return _HDR.pack(*fields) + payload


def icmp(icmp_type: int, code: int = 0, rest: bytes = b"\0\0\0\0", body: bytes = b"") -> bytes:
    msg = struct.pack("!BBH", icmp_type, code, 0) + rest + body
    return msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]


def echo_request(src: str, dst: str, ttl: int = 64, ident: int = 7, seq: int = 1,
                 data: bytes = b"flannel-test") -> bytes:
    return ipv4(src, dst, ICMP, icmp(8, 0, struct.pack("!HH", ident, seq), data), ttl=ttl)


def udp_packet(src: str, dst: str, data: bytes = b"x", ttl: int = 64, **kw) -> bytes:
    """A UDP-in-IPv4 packet; the UDP checksum is 0 (allowed for IPv4)."""
    seg = struct.pack("!HHHH", 4000, 5000, 8 + len(data), 0) + data
    return ipv4(src, dst, UDP, seg, ttl=ttl, **kw)


@dataclass
class Parsed:
    src: IPv4Address
    dst: IPv4Address
    proto: int
    ttl: int
    header_ok: bool
    payload: bytes
    raw: bytes

    @property
    def icmp_type(self) -> int:
        return self.payload[0]

    @property
    def icmp_code(self) -> int:
        return self.payload[1]

    @property
    def icmp_ok(self) -> bool:
        return checksum(self.payload) == 0


def parse(pkt: bytes) -> Parsed:
    ver_ihl, _tos, total, _id, _frag, ttl, proto, _sum, src, dst = _HDR.unpack_from(pkt)
    ihl = (ver_ihl & 0xF) * 4
    return Parsed(IPv4Address(src), IPv4Address(dst), proto, ttl,
                  checksum(pkt[:ihl]) == 0, pkt[ihl:total], pkt)


def echo_reply_for(request: bytes) -> bytes:
    """The echo reply a host would send for `request` (addresses swapped, type 0)."""
    req = parse(request)
    body = req.payload
    return ipv4(str(req.dst), str(req.src), ICMP, icmp(0, 0, body[4:8], body[8:]))
