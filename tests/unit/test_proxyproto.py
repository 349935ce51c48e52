"""The PROXY protocol parser: every valid shape and every way to get one wrong.

Each case runs whole, byte by byte (NEED_MORE up to the deciding byte, then the same
answer as whole) and inside a larger buffer whose bytes around [start, end) would change
the answer if they were read.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import proxyheader as ph

from minismtp.smtp.proxyproto import (
    MAX_HEADER_BYTES, NEED_MORE, REASONS, V1_MAX_BYTES, V2_MAX_BYTES, Command, Family,
    TCP4_BYTES, ProxyError, ProxyHeader, Version, haproxy_tcp4_source, parse, trusted,
)

ANY, V1, V2 = Version.ANY, Version.V1, Version.V2
SIG = ph.SIGNATURE


def outcome(data: bytes | bytearray | memoryview, accept: Version = ANY, start: int = 0,
            end: int | None = None) -> object:
    """The header, NEED_MORE, or the error's reason as a string."""
    try:
        return parse(data, start, len(data) if end is None else end, accept)
    except ProxyError as e:
        return e.reason


def decided_at(data: bytes, accept: Version = ANY) -> tuple[int, object]:
    """Fed one more byte at a time: (bytes present when the answer came, the answer)."""
    for n in range(len(data) + 1):
        result = outcome(data[:n], accept)
        if result is not NEED_MORE:
            return n, result
    return len(data) + 1, NEED_MORE


def header(consumed: int, family: Family, src=None, dst=None, *, version: int,
           command: Command = Command.PROXY) -> ProxyHeader:
    return ProxyHeader(consumed, command, family, src, dst, version)


# -- valid headers ---------------------------------------------------------------------

V4_SRC, V4_DST = ("192.0.2.10", 56324), ("198.51.100.25", 25)
V6_SRC, V6_DST = ("2001:db8::10", 40000), ("2001:db8:ffff::25", 587)
LONGEST_V6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
TLVS = [(ph.PP2_TYPE_ALPN, b"smtp"), (ph.PP2_TYPE_AUTHORITY, b"mx.example.org"),
        (ph.PP2_TYPE_NOOP, b""), (ph.PP2_TYPE_UNIQUE_ID, b"\x00" * 128), (0xE0, b"\xff")]

VALID = [
    # (wire bytes, accept, expected header)
    (b"PROXY TCP4 192.0.2.10 198.51.100.25 56324 25\r\n", ANY,
     header(46, Family.TCP4, V4_SRC, V4_DST, version=1)),
    (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", V1,
     header(56, Family.TCP4, ("255.255.255.255", 65535), ("255.255.255.255", 65535),
            version=1)),
    (b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n", V1,
     header(32, Family.TCP4, ("0.0.0.0", 0), ("0.0.0.0", 0), version=1)),
    (b"PROXY TCP6 2001:db8::10 2001:db8:ffff::25 40000 587\r\n", ANY,
     header(53, Family.TCP6, V6_SRC, V6_DST, version=1)),
    (f"PROXY TCP6 {LONGEST_V6} {LONGEST_V6} 65535 65535\r\n".encode(), V1,
     header(104, Family.TCP6, (LONGEST_V6, 65535), (LONGEST_V6, 65535), version=1)),
    # Upper case hex and a full form are printed the way ipaddress prints them.
    (b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 1 2\r\n", V1,
     header(41, Family.TCP6, ("2001:db8::1", 1), ("::1", 2), version=1)),
    # IPv4-mapped (HAProxy's TCP6 line when one side is IPv4): reported as IPv4.
    (b"PROXY TCP6 ::ffff:192.0.2.10 2001:db8::25 56324 25\r\n", V1,
     header(52, Family.TCP6, V4_SRC, ("2001:db8::25", 25), version=1)),
    (b"PROXY UNKNOWN\r\n", ANY, header(15, Family.UNSPEC, version=1)),
    (b"PROXY UNKNOWN whatever \xff\x00 follows\r\n", V1, header(35, Family.UNSPEC, version=1)),
    # The longest line the specification allows, 107 bytes with its CRLF.
    (f"PROXY UNKNOWN {LONGEST_V6} {LONGEST_V6} 65535 65535\r\n".encode(), V1,
     header(107, Family.UNSPEC, version=1)),
    (ph.v2(V4_SRC, V4_DST), ANY, header(28, Family.TCP4, V4_SRC, V4_DST, version=2)),
    (ph.v2(V6_SRC, V6_DST), V2, header(52, Family.TCP6, V6_SRC, V6_DST, version=2)),
    (ph.v2(("::ffff:192.0.2.10", 1), ("::ffff:198.51.100.25", 2)), V2,
     header(52, Family.TCP6, ("192.0.2.10", 1), ("198.51.100.25", 2), version=2)),
    (ph.v2(V4_SRC, V4_DST, TLVS), ANY,
     header(28 + sum(3 + len(v) for _, v in TLVS), Family.TCP4, V4_SRC, V4_DST, version=2)),
    (ph.v2(V6_SRC, V6_DST, [(ph.PP2_TYPE_NOOP, b"")]), V2,
     header(55, Family.TCP6, V6_SRC, V6_DST, version=2)),
    # LOCAL: the balancer's health check. Its block is skipped, whatever it holds.
    (ph.local_v2(), ANY, header(16, Family.UNSPEC, command=Command.LOCAL, version=2)),
    (ph.local_v2([(ph.PP2_TYPE_UNIQUE_ID, b"abc")]), V2,
     header(22, Family.UNSPEC, command=Command.LOCAL, version=2)),
    (ph.v2(V4_SRC, V4_DST, command=ph.LOCAL), V2,
     header(28, Family.UNSPEC, command=Command.LOCAL, version=2)),
    (ph.v2_raw(ph.LOCAL, ph.UDP6, b"\x01"), V2,  # not even TLVs: never read
     header(17, Family.UNSPEC, command=Command.LOCAL, version=2)),
    # PROXY with UNSPEC: accepted, no addresses, the block skipped unread.
    (ph.v2_raw(ph.PROXY, ph.UNSPEC, b""), ANY, header(16, Family.UNSPEC, version=2)),
    (ph.v2_raw(ph.PROXY, ph.UNSPEC, b"\x01\x02\x03\x04\x05"), V2,
     header(21, Family.UNSPEC, version=2)),
    # UNIX stream (a balancer that took the client on a local socket): no addresses.
    (ph.v2_raw(ph.PROXY, ph.UNIX_STREAM, b"/run/a".ljust(108, b"\0") * 2), V2,
     header(232, Family.UNIX, version=2)),
    (ph.v2_raw(ph.PROXY, ph.UNIX_STREAM, b"\0" * 216 + ph.tlv(1, b"x")), V2,
     header(236, Family.UNIX, version=2)),
    # The largest header taken: 16 + 536 bytes.
    (ph.v2(V4_SRC, V4_DST, [(0xE1, b"\xab" * (536 - 12 - 3))]), V2,
     header(V2_MAX_BYTES, Family.TCP4, V4_SRC, V4_DST, version=2)),
]
VALID_IDS = [repr(data[:40]) for data, _, _ in VALID]


@pytest.mark.parametrize("data, accept, expected", VALID, ids=VALID_IDS)
def test_valid_header_whole(data: bytes, accept: Version, expected: ProxyHeader) -> None:
    assert len(data) == expected.consumed
    assert outcome(data, accept) == expected


@pytest.mark.parametrize("data, accept, expected", VALID, ids=VALID_IDS)
def test_valid_header_needs_every_byte(data: bytes, accept: Version,
                                       expected: ProxyHeader) -> None:
    for n in range(len(data)):
        assert outcome(data[:n], accept) is NEED_MORE, n
    assert outcome(data, accept) == expected


@pytest.mark.parametrize("data, accept, expected", VALID, ids=VALID_IDS)
def test_smtp_after_the_header_is_left_alone(data: bytes, accept: Version,
                                             expected: ProxyHeader) -> None:
    for after in (b"E", b"EHLO client.example\r\n", b"\r\n", b"PROXY UNKNOWN\r\n",
                  SIG, b"\xff" * 600):
        assert outcome(data + after, accept) == expected


@pytest.mark.parametrize("data, accept, expected", VALID, ids=VALID_IDS)
def test_valid_header_inside_a_larger_buffer(data: bytes, accept: Version,
                                             expected: ProxyHeader) -> None:
    # Bytes before `start` that would fail the parse, and after `end` the header's own
    # tail: reading either would change the answer.
    before = b"EHLO\r\n\xff"
    for cut in range(len(data) + 1):
        buf = bytearray(before + data + b"QUIT\r\n")
        start, end = len(before), len(before) + cut
        want = expected if cut == len(data) else NEED_MORE
        assert outcome(buf, accept, start, end) == want, cut
        assert outcome(bytes(buf), accept, start, end) == want, cut
        # A memoryview that ends at `end`: a read past it would raise IndexError.
        assert outcome(memoryview(buf)[:end], accept, start, end) == want, cut


def test_consumed_counts_from_start_not_from_zero() -> None:
    data = bytearray(b"xx" + ph.v1(V4_SRC, V4_DST) + b"EHLO a\r\n")
    got = parse(data, 2, len(data), ANY)
    assert got.consumed == len(ph.v1(V4_SRC, V4_DST))
    assert data[2 + got.consumed:] == b"EHLO a\r\n"


# -- malformed headers -----------------------------------------------------------------

V1_OK = b"PROXY TCP4 192.0.2.10 198.51.100.25 56324 25\r\n"
V2_OK = ph.v2(V4_SRC, V4_DST)


def v1_line(src: str = "192.0.2.10", dst: str = "198.51.100.25", sport: str = "56324",
            dport: str = "25", proto: str = "TCP4") -> bytes:
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode("latin-1")


END = -1  # decided on the line's LF: all of it


def upto(data: bytes, marker: bytes) -> int:
    """Bytes present once `marker`'s first byte has arrived."""
    return data.index(marker) + 1


BAD = [
    # (wire bytes, accept, reason, bytes present when it is decided)
    # Not a header: told on the first byte that cannot begin one.
    (b"EHLO client.example\r\n", ANY, "not a proxy header", 1),
    (b"GET / HTTP/1.1\r\n", ANY, "not a proxy header", 1),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", ANY, "not a proxy header", 1),  # TLS
    (b"\x00", ANY, "not a proxy header", 1),
    (b"EHLO x\r\n", V1, "not a proxy header", 1),
    (b"EHLO x\r\n", V2, "not a proxy header", 1),
    (b"PING\r\n", ANY, "not a proxy header", 2),
    (b"PROXX TCP4", V1, "not a proxy header", 5),
    (b"\r\n\r\nQUIT\r\n", ANY, "not a proxy header", 5),  # empty lines, not the signature
    (b"\r\nQUIT\r\n", V2, "not a proxy header", 3),
    (SIG[:11] + b"\r" + V2_OK[12:], V2, "not a proxy header", 12),
    # The other version where one is configured: told on the first byte.
    (V2_OK, V1, "unsupported version", 1),
    (V1_OK, V2, "unsupported version", 1),
    # v1 shape.
    (b"PROXY\tTCP4 1.2.3.4 5.6.7.8 1 2\r\n", V1, "bad v1 header", 6),
    (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", V1, "bad v1 header", 7),
    (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", V1, "bad v1 header", 7),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", V1, "bad v1 header", 10),
    (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", V1, "bad v1 header", 8),  # "U": UNKNOWN?
    (b"PROXY TCP4\r\n", V1, "bad v1 header", 11),
    (b"PROXY \r\n", V1, "bad v1 header", 7),
    (b"PROXY\r\n", V1, "bad v1 header", 6),
    (b"PROXY UNKNOWNX\r\n", V1, "bad v1 header", 14),
    (b"PROXY UNKNOWN\n", V1, "bad v1 header", 14),
    (b"PROXY UNKNOWN a\rb\r\n", V1, "bad v1 header", 17),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", V1, "bad v1 header", 31),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", V1, "bad v1 header", 32),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", V1, "bad v1 header", 32),
    (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", V1, "bad v1 header", 12),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", V1, "bad v1 header", 20),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", V1, "bad v1 header", 31),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", V1, "bad v1 header", 31),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", V1, "bad v1 header", 30),
    (b"PROXY TCP4 1.2.3.4\r\n", V1, "bad v1 header", 20),
    (v1_line(sport="-1"), V1, "bad v1 header", upto(v1_line(sport="-1"), b"-")),
    (v1_line(sport="+1"), V1, "bad v1 header", upto(v1_line(sport="+1"), b"+")),
    (v1_line(src="2001:db8::1"), V1, "bad v1 header", 16),  # ":" in a TCP4 line
    (v1_line(src="fe80::1%eth0", dst="::1", proto="TCP6"), V1, "bad v1 header", 19),
    (v1_line(src="1.2.3.4\xe9"), V1, "bad v1 header", 19),
    # v1 length: 107 bytes without a CRLF is the end of waiting.
    (b"PROXY UNKNOWN " + b"x" * 200, V1, "v1 header too long", V1_MAX_BYTES),
    (b"PROXY TCP6 " + b"f" * 200, V1, "v1 header too long", V1_MAX_BYTES),
    (f"PROXY UNKNOWN {LONGEST_V6} {LONGEST_V6} 65535 655350\r\n".encode(), V1,
     "v1 header too long", V1_MAX_BYTES),
    # v1 addresses and ports, decoded once the CRLF is in.
    (v1_line(src="192.0.2.010"), V1, "bad address", END),  # a leading zero (octal?)
    (v1_line(src="256.0.0.1"), V1, "bad address", END),
    (v1_line(src="1.2.3"), V1, "bad address", END),
    (v1_line(src="1.2.3.4.5"), V1, "bad address", END),
    (v1_line(src="192.0.2.10", dst="2001:db8::1", proto="TCP6"), V1, "bad address", END),
    (v1_line(src=":::", dst="::1", proto="TCP6"), V1, "bad address", END),
    (v1_line(src="12345::1", dst="::1", proto="TCP6"), V1, "bad address", END),
    (v1_line(src="::ffff:01.2.3.4", dst="::1", proto="TCP6"), V1, "bad address", END),
    (v1_line(sport="65536"), V1, "bad port", END),
    (v1_line(sport="01"), V1, "bad port", END),
    (v1_line(sport="00"), V1, "bad port", END),
    (v1_line(sport="123456"), V1, "bad port", END),
    (v1_line(src="::1", dst="::1", sport="1a", proto="TCP6"), V1, "bad port", END),
    (v1_line(src="256.0.0.1", sport="65536"), V1, "bad address", END),  # address first
    # v2 fixed part.
    (ph.v2_raw(0x11, ph.TCP4, V2_OK[16:]), V2, "bad v2 version", 13),
    (ph.v2_raw(0x31, ph.TCP4, V2_OK[16:]), ANY, "bad v2 version", 13),
    (ph.v2_raw(0x01, ph.TCP4, V2_OK[16:]), V2, "bad v2 version", 13),
    (ph.v2_raw(0x22, ph.TCP4, V2_OK[16:]), V2, "bad v2 command", 13),
    (ph.v2_raw(0x2F, ph.TCP4, V2_OK[16:]), ANY, "bad v2 command", 13),
    (ph.v2_raw(ph.PROXY, ph.UDP4, V2_OK[16:]), V2, "bad v2 family", 14),
    (ph.v2_raw(ph.PROXY, ph.UDP6, b"\0" * 36), V2, "bad v2 family", 14),
    (ph.v2_raw(ph.PROXY, ph.UNIX_DGRAM, b"\0" * 216), V2, "bad v2 family", 14),
    (ph.v2_raw(ph.PROXY, 0x13, V2_OK[16:]), V2, "bad v2 family", 14),
    (ph.v2_raw(ph.PROXY, 0x41, V2_OK[16:]), V2, "bad v2 family", 14),
    (ph.v2_raw(ph.PROXY, 0x01, V2_OK[16:]), V2, "bad v2 family", 14),
    (ph.v2_raw(ph.PROXY, 0x10, V2_OK[16:]), V2, "bad v2 family", 14),
    (ph.v2_raw(ph.LOCAL, 0x41, b""), V2, "bad v2 family", 14),
    # v2 lengths: too short for the family, or past the cap, told on the length field.
    (ph.v2_raw(ph.PROXY, ph.TCP4, V2_OK[16:27]), V2, "v2 length too short for its family", 16),
    (ph.v2_raw(ph.PROXY, ph.TCP4, b""), V2, "v2 length too short for its family", 16),
    (ph.v2_raw(ph.PROXY, ph.TCP6, b"\0" * 35), V2, "v2 length too short for its family", 16),
    (ph.v2_raw(ph.PROXY, ph.UNIX_STREAM, b"\0" * 215), V2,
     "v2 length too short for its family", 16),
    (ph.v2_raw(ph.PROXY, ph.TCP4, V2_OK[16:], length=537), V2, "v2 header too long", 16),
    (ph.v2_raw(ph.PROXY, ph.TCP4, V2_OK[16:], length=0xFFFF), V2, "v2 header too long", 16),
    (ph.v2_raw(ph.LOCAL, ph.UNSPEC, b"", length=0xFFFF), V2, "v2 header too long", 16),
    # v2 TLVs: too little room for one is known from the length alone; one running past
    # the header as soon as its own length arrives.
    (V2_OK[:15] + b"\x0d" + V2_OK[16:] + b"\x01", V2, "bad v2 tlv", 16),
    (V2_OK[:15] + b"\x0e" + V2_OK[16:] + b"\x01\x00", V2, "bad v2 tlv", 16),
    (ph.v2_raw(ph.PROXY, ph.TCP4, V2_OK[16:] + b"\x01\x00\x0a" + b"x" * 5), V2,
     "bad v2 tlv", 31),
    (ph.v2_raw(ph.PROXY, ph.TCP4, V2_OK[16:] + ph.tlv(1, b"ab") + b"\x02\xff\xff"), V2,
     "bad v2 tlv", 36),
    (ph.v2_raw(ph.PROXY, ph.TCP4, V2_OK[16:] + ph.tlv(1, b"ab") + b"\x02\x00"), V2,
     "bad v2 tlv", 31),
    (ph.v2_raw(ph.PROXY, ph.TCP6, b"\0" * 36 + b"\x01\x00\x01"), V2, "bad v2 tlv", 55),
]
BAD = [(data, accept, reason, len(data) if at == END else at)
       for data, accept, reason, at in BAD]
BAD_IDS = [f"{reason}:{data[:24]!r}" for data, _, reason, _ in BAD]


@pytest.mark.parametrize("data, accept, reason, at", BAD, ids=BAD_IDS)
def test_malformed_whole(data: bytes, accept: Version, reason: str, at: int) -> None:
    assert outcome(data, accept) == reason


@pytest.mark.parametrize("data, accept, reason, at", BAD, ids=BAD_IDS)
def test_malformed_told_as_soon_as_the_bytes_show_it(data: bytes, accept: Version,
                                                     reason: str, at: int) -> None:
    assert decided_at(data, accept) == (at, reason)


@pytest.mark.parametrize("data, accept, reason, at", BAD, ids=BAD_IDS)
def test_malformed_inside_a_larger_buffer(data: bytes, accept: Version, reason: str,
                                          at: int) -> None:
    before = b"\r\n\r\n\x00\r\nQUIT\n!"  # a v2 signature: misleading if read
    buf = bytearray(before + data + V1_OK)
    start = len(before)
    assert outcome(buf, accept, start, start + at - 1) is NEED_MORE
    assert outcome(buf, accept, start, start + at) == reason
    assert outcome(memoryview(buf)[:start + len(data)], accept, start,
                   start + len(data)) == reason


def test_every_reason_is_exercised() -> None:
    assert {reason for _, _, reason, _ in BAD} == REASONS


def test_nothing_is_needed_from_a_silent_client() -> None:
    for accept in Version:
        assert parse(b"", 0, 0, accept) is NEED_MORE
        assert parse(b"PROXY TCP4 1.2.3.4", 5, 5, accept) is NEED_MORE


def test_bounds_are_checked() -> None:
    for start, end in ((-1, 2), (3, 2), (0, 9)):
        with pytest.raises(ValueError):
            parse(b"PROXY UNKNOWN\r\n"[:8], start, end, ANY)


def test_error_carries_its_reason() -> None:
    with pytest.raises(ProxyError) as caught:
        parse(b"HELO", 0, 4, ANY)
    assert caught.value.reason == "not a proxy header"
    assert str(caught.value) == "not a proxy header"


def test_need_more_stops_at_the_caps() -> None:
    assert MAX_HEADER_BYTES == V2_MAX_BYTES == 552
    longest_wait = ph.v2(V4_SRC, V4_DST, [(0xE1, b"\0" * 521)])
    assert len(longest_wait) == V2_MAX_BYTES
    assert outcome(longest_wait[:-1], V2) is NEED_MORE
    assert outcome(longest_wait[:16], V2) is NEED_MORE
    assert outcome(b"PROXY UNKNOWN " + b"x" * (V1_MAX_BYTES - 15), V1) is NEED_MORE
    assert outcome(b"PROXY UNKNOWN " + b"x" * (V1_MAX_BYTES - 14), V1) == "v1 header too long"


# -- the support encoder agrees with the specification's examples ----------------------

def test_encoder_shapes() -> None:
    assert ph.v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == \
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert ph.v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert ph.v2(V4_SRC, V4_DST)[12:16] == b"\x21\x11\x00\x0c"
    assert ph.v2(V6_SRC, V6_DST)[12:16] == b"\x21\x21\x00\x24"
    assert ph.local_v2() == SIG + b"\x20\x00\x00\x00"
    with pytest.raises(ValueError):
        ph.v1(V4_SRC, V6_DST)


# -- trusted ---------------------------------------------------------------------------

BALANCERS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:1::/48"))


@pytest.mark.parametrize("peer, expected", [
    ("10.1.2.3", True),
    ("11.1.2.3", False),
    ("2001:db8:1::5", True),
    ("2001:db8:2::5", False),
    ("::ffff:10.1.2.3", True),  # a dual-stack socket's view of an IPv4 balancer
    ("::ffff:11.1.2.3", False),
    ("::1", False),
    ("not an address", False),
    ("", False),
])
def test_trusted(peer: str, expected: bool) -> None:
    assert trusted(peer, BALANCERS) is expected


def test_trusted_by_nobody() -> None:
    assert trusted("10.1.2.3", ()) is False
    assert trusted("127.0.0.1", (ipaddress.ip_network("127.0.0.1/32"),)) is True


# -- HAProxy's usual header, in one step -------------------------------------------------

IPV4 = st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 0xFFFF))


@given(src=IPV4, dst=IPV4, after=st.binary(max_size=40))
def test_haproxy_tcp4_source_is_the_source_parse_finds(src, dst, after):
    data = bytearray(ph.v2(src, dst) + after)
    assert haproxy_tcp4_source(data, len(data)) == src
    assert outcome(data, V2).source == src and outcome(data, V2).consumed == TCP4_BYTES


@given(src=IPV4, dst=IPV4, cut=st.integers(0, TCP4_BYTES - 1))
def test_haproxy_tcp4_source_needs_the_whole_header(src, dst, cut):
    data = bytearray(ph.v2(src, dst))
    assert haproxy_tcp4_source(data, cut) is None  # bytes past `end` are not looked at


@given(data=st.one_of(
    st.binary(max_size=60),
    st.builds(lambda i, b, tail: bytes(ph.v2(V4_SRC, V4_DST)[:i]) + bytes([b]) + tail,
              st.integers(0, 15), st.integers(0, 255), st.binary(min_size=12, max_size=30))))
def test_haproxy_tcp4_source_answers_only_for_that_header(data):
    """Any other bytes, a one-byte change to the fixed part included, get None: `parse`
    judges them (into a header, NEED_MORE or an error), never this."""
    found = haproxy_tcp4_source(bytearray(data), len(data))
    if found is not None:
        assert data.startswith(ph.v2(V4_SRC, V4_DST)[:16])
        assert outcome(data, V2).source == found


@pytest.mark.parametrize("data", [
    ph.v2(V4_SRC, V4_DST, [(ph.PP2_TYPE_NOOP, b"")]),  # a TLV: another length
    ph.v2(V6_SRC, V6_DST),
    ph.local_v2(),
    ph.v1(V4_SRC, V4_DST),
], ids=["tlv", "tcp6", "local", "v1"])
def test_haproxy_tcp4_source_leaves_other_headers_to_parse(data):
    assert haproxy_tcp4_source(bytearray(data), len(data)) is None
