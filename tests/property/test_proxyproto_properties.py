"""Hypothesis: the PROXY protocol parser on any bytes, and on headers built independently.

Headers come from `support.proxyheader` (struct and ipaddress, not the parser's code);
near-misses are those headers with bytes replaced, inserted, dropped or cut, since random
bytes alone rarely get past the first byte.
"""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import proxyheader as ph

from minismtp.smtp.proxyproto import (
    MAX_HEADER_BYTES, NEED_MORE, REASONS, V1_MAX_BYTES, V2_MAX_BYTES, Command, Family,
    ProxyError, ProxyHeader, Version, parse,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ports = st.integers(min_value=0, max_value=0xFFFF)
ipv4 = st.builds(ipaddress.IPv4Address, st.integers(min_value=0, max_value=2**32 - 1))
ipv6 = st.builds(ipaddress.IPv6Address, st.integers(min_value=0, max_value=2**128 - 1))
# Biased towards the forms that print specially: mapped, zero runs, loopback.
ipv6_edgy = st.one_of(
    ipv6,
    ipv4.map(lambda a: ipaddress.IPv6Address(f"::ffff:{a}")),
    st.sampled_from([ipaddress.IPv6Address(a) for a in ("::", "::1", "2001:db8::", "fe80::1")]),
)
v4_pairs = st.tuples(ipv4, ports, ipv4, ports)
v6_pairs = st.tuples(ipv6_edgy, ports, ipv6_edgy, ports)
tlv_lists = st.lists(st.tuples(st.integers(min_value=0, max_value=255), st.binary(max_size=40)),
                     max_size=6)


def expected_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """What the parser reports: an IPv4-mapped address as the IPv4 it maps."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def outcome(data: bytes | bytearray, accept: Version, start: int = 0,
            end: int | None = None) -> object:
    try:
        return parse(data, start, len(data) if end is None else end, accept)
    except ProxyError as e:
        return ("error", e.reason)


@st.composite
def valid_headers(draw) -> bytes:
    """Any header the parser must take: v1 or v2, either family, TLVs, LOCAL, UNKNOWN."""
    kind = draw(st.sampled_from(["v1", "v2", "v1-unknown", "v2-local", "v2-unspec"]))
    if kind == "v1-unknown":
        return ph.v1(None, None)
    if kind == "v2-local":
        return ph.local_v2(draw(tlv_lists))
    if kind == "v2-unspec":
        return ph.v2_raw(ph.PROXY, ph.UNSPEC, draw(st.binary(max_size=60)))
    s, sp, d, dp = draw(st.one_of(v4_pairs, v6_pairs))
    if kind == "v1":
        return ph.v1((str(s), sp), (str(d), dp))
    return ph.v2((str(s), sp), (str(d), dp), draw(tlv_lists))


@st.composite
def near_misses(draw) -> bytes:
    """A valid header with a few bytes changed, inserted or removed, or cut short."""
    data = bytearray(draw(valid_headers()))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        at = draw(st.integers(min_value=0, max_value=len(data)))
        op = draw(st.sampled_from(["replace", "insert", "delete", "cut"]))
        byte = draw(st.sampled_from([0x00, 0x0D, 0x0A, 0x20, 0x2E, 0x30, 0x31, 0x36, 0x3A,
                                     0x66, 0xFF, 0x11, 0x21, 0x41])) if draw(st.booleans()) \
            else draw(st.integers(min_value=0, max_value=255))
        if op == "replace" and at < len(data):
            data[at] = byte
        elif op == "insert":
            data.insert(at, byte)
        elif op == "delete" and at < len(data):
            del data[at]
        elif op == "cut":
            del data[at:]
    return bytes(data) + draw(st.binary(max_size=8))


any_bytes = st.one_of(st.binary(max_size=700), near_misses(),
                      valid_headers().map(lambda h: h + b"EHLO x\r\n"))
# ANY twice as often: a header of the other version is refused on its first byte.
accepts = st.sampled_from([Version.ANY, Version.ANY, Version.V1, Version.V2])


def assert_one_of_three(result: object, available: int) -> None:
    if result is NEED_MORE:
        assert available < MAX_HEADER_BYTES
    elif isinstance(result, ProxyHeader):
        assert 0 < result.consumed <= available
        assert result.consumed <= (V1_MAX_BYTES if result.version == 1 else V2_MAX_BYTES)
        if result.source is None:
            assert result.destination is None
    else:
        kind, reason = result
        assert kind == "error" and reason in REASONS


@given(data=any_bytes, accept=accepts, pad=st.binary(max_size=4))
@FAST
def test_any_bytes_give_need_more_a_header_or_proxy_error(data: bytes, accept: Version,
                                                          pad: bytes) -> None:
    # Any other exception fails the test on its own.
    buf = bytearray(pad + data + pad)
    result = outcome(buf, accept, len(pad), len(pad) + len(data))
    assert_one_of_three(result, len(data))
    assert outcome(bytes(data), accept) == result
    assert outcome(memoryview(buf)[:len(pad) + len(data)], accept, len(pad)) == result


@example(data=b"PROXY UNKNOWN " + b"x" * 200, accept=Version.V1)
@example(data=ph.v2_raw(ph.PROXY, ph.TCP4, bytes(600), length=536), accept=Version.ANY)
@given(data=any_bytes, accept=accepts)
@FAST
def test_one_answer_whatever_the_split(data: bytes, accept: Version) -> None:
    """Fed a byte at a time: NEED_MORE, then one answer that more bytes never change,
    and never NEED_MORE with the cap's worth of bytes present."""
    answers = [outcome(data[:n], accept) for n in range(len(data) + 1)]
    decided = next((n for n, a in enumerate(answers) if a is not NEED_MORE), None)
    if decided is None:
        assert len(data) < MAX_HEADER_BYTES
        return
    if data[:1] == b"P":
        assert decided <= V1_MAX_BYTES
    assert decided <= MAX_HEADER_BYTES
    assert all(a == answers[decided] for a in answers[decided:])
    if isinstance(answers[decided], ProxyHeader):
        assert answers[decided].consumed == decided


@given(pair=v4_pairs, tlvs=tlv_lists, after=st.binary(max_size=40))
@FAST
def test_round_trip_v2_ipv4(pair, tlvs, after: bytes) -> None:
    s, sp, d, dp = pair
    wire = ph.v2((str(s), sp), (str(d), dp), tlvs)
    got = parse(wire + after, 0, len(wire) + len(after), Version.V2)
    assert got == ProxyHeader(len(wire), Command.PROXY, Family.TCP4, (str(s), sp),
                              (str(d), dp), 2)


@given(pair=v6_pairs, tlvs=tlv_lists, after=st.binary(max_size=40))
@FAST
def test_round_trip_v2_ipv6(pair, tlvs, after: bytes) -> None:
    s, sp, d, dp = pair
    wire = ph.v2((str(s), sp), (str(d), dp), tlvs)
    got = parse(wire + after, 0, len(wire) + len(after), Version.ANY)
    assert got == ProxyHeader(len(wire), Command.PROXY, Family.TCP6, (expected_ip(s), sp),
                              (expected_ip(d), dp), 2)


@given(pair=st.one_of(v4_pairs, v6_pairs), after=st.binary(max_size=40),
       upper=st.booleans())
@FAST
def test_round_trip_v1(pair, after: bytes, upper: bool) -> None:
    s, sp, d, dp = pair
    wire = ph.v1((str(s), sp), (str(d), dp))
    if upper:  # hex digits in either case
        wire = wire[:11] + wire[11:].upper()
    family = Family.TCP4 if s.version == 4 else Family.TCP6
    got = parse(wire + after, 0, len(wire) + len(after), Version.V1)
    assert got == ProxyHeader(len(wire), Command.PROXY, family, (expected_ip(s), sp),
                              (expected_ip(d), dp), 1)


@given(wire=valid_headers(), accept=st.sampled_from([Version.ANY, None]))
@FAST
def test_every_strict_prefix_needs_more(wire: bytes, accept: Version | None) -> None:
    accept = accept or (Version.V2 if wire[:1] == b"\r" else Version.V1)
    for n in range(len(wire)):
        assert parse(wire, 0, n, accept) is NEED_MORE, n
        assert parse(wire[:n], 0, n, accept) is NEED_MORE, n
    assert isinstance(parse(wire, 0, len(wire), accept), ProxyHeader)


@given(wire=valid_headers(), after=st.binary(max_size=MAX_HEADER_BYTES + 10),
       pad=st.binary(max_size=6))
@FAST
def test_bytes_after_a_header_change_nothing(wire: bytes, after: bytes, pad: bytes) -> None:
    alone = parse(wire, 0, len(wire), Version.ANY)
    assert isinstance(alone, ProxyHeader) and alone.consumed == len(wire)
    buf = bytearray(pad + wire + after)
    assert parse(buf, len(pad), len(buf), Version.ANY) == alone
