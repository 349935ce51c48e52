"""The PROXY protocol header (versions 1 and 2) a load balancer sends before any SMTP byte.

Untrusted input: the first bytes of a connection, at most `MAX_HEADER_BYTES` of them
looked at. Only a trusted balancer may send a header (`trusted()`; the caller closes other
connections first), but a balancer can be misconfigured and a port can be reached by
anyone, so every byte is checked: nothing here trusts a length it has not bounded.

`parse(data, start, end, accept)` looks at `data[start:end]` and nothing outside it, and
answers one of three ways:

- `NEED_MORE`: every byte so far can begin a valid header; read more. This is never the
  answer once `MAX_HEADER_BYTES` are present, so the caller's read stays bounded.
- a `ProxyHeader`: `consumed` bytes from `start` are the header; what follows is SMTP and
  is left alone.
- `ProxyError(reason)`, raised as soon as the bytes present rule out every valid header.
  A first byte that starts neither header fails at once, so a plain client on a PROXY
  port is turned away on its first byte. `reason` is one of `REASONS`, short and fixed:
  a counter label, never client text.

Version 1 is one text line, `PROXY TCP4|TCP6|UNKNOWN ...` and CRLF, at most 107 bytes with
the CRLF. Parsed strictly: single spaces, exactly four fields after TCP4/TCP6, addresses
of the family named, ports in decimal from 0 to 65535 with no leading zero ("0" alone is
zero), and only CRLF ends the line (a bare CR or LF is an error). As the specification
asks, addresses and ports are decoded only once the CRLF is in; the line's shape (its
prefix, its protocol word, its characters, a stray CR or LF, its length) is checked byte
by byte before that. UNKNOWN may carry anything but CR and LF up to the CRLF and gives
no addresses.

Version 2 is binary: a 12-byte signature, version and command, family and protocol, a
16-bit length, the address block, then TLVs. Decisions:

- Command LOCAL (a health check from the balancer itself): the family byte must be one
  the specification defines, and the rest is skipped unread; no addresses.
- Command PROXY: TCP over IPv4 or IPv6 gives addresses; UNSPEC and UNIX stream are
  accepted with none (the caller keeps the real endpoints, as the specification allows);
  UDP and UNIX datagram are refused ("bad v2 family"): SMTP is a stream, and a header
  saying otherwise comes from a misconfigured balancer.
- The length must cover the family's address block. After a block of known size (TCP4,
  TCP6, UNIX) the TLVs are walked, bounds-checked, and skipped: a TLV cut short or running
  past the header is "bad v2 tlv". After UNSPEC the block's layout is unknown, so it is
  skipped whole. No TLV is interpreted; a CRC32C TLV is not verified.
- A header longer than `V2_MAX_BYTES` (16 + 536) is refused as soon as its length field
  is read, without waiting for its bytes. 536 is the smallest TCP segment every host must
  take (576 - 40), which the specification says both header forms are designed to fit
  in, and HAProxy's usual TLVs (ALPN, authority, unique ID, TLS version and cipher)
  leave room. A balancer configured to append a client certificate TLV will exceed it,
  and such headers are refused.

IPv4-mapped IPv6 addresses (::ffff:a.b.c.d, which HAProxy sends over TCP6 when one side
is IPv4 and the other IPv6) are reported as the IPv4 address they map, so the client
reads the same as over TCP4 (in logs, `Received:`, checks by network). An IPv6 zone
("%eth0") is refused in version 1; version 2 cannot carry one.

`accept` is what the listener expects: `Version.V1`, `Version.V2`, or `Version.ANY`, which
picks by the first byte (CR for the version 2 signature, "P" for "PROXY "). Where only one
version is accepted, a first byte that begins the other one fails at once with
"unsupported version" (and so does "POST" on a v2-only port): the label is
judged from that byte alone, so that neither the answer nor its reason waits for more
bytes or depends on how they were split. The same holds throughout: bytes fed whole
and the same bytes fed in pieces give the same header or the same reason.

Input may be a bytes, bytearray or memoryview. Bytes and bytearrays are searched in place
with `find`; a memoryview (which has no `find`) has the bounded window copied once.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from typing import NamedTuple

V1_MAX_BYTES = 107  # "PROXY UNKNOWN " + two 39-char IPv6 + two ports + spaces + CRLF
V2_HEADER_BYTES = 16  # signature, version/command, family, length
V2_MAX_BYTES = V2_HEADER_BYTES + 536  # see the module docstring
MAX_HEADER_BYTES = max(V1_MAX_BYTES, V2_MAX_BYTES)  # NEED_MORE never past this many

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
_V1_FIRST, _V2_FIRST = V1_PREFIX[0], V2_SIGNATURE[0]

REASONS = frozenset({
    "not a proxy header", "bad v1 header", "v1 header too long", "bad v2 version",
    "bad v2 command", "bad v2 family", "v2 length too short for its family",
    "v2 header too long", "bad v2 tlv", "unsupported version", "bad address", "bad port",
})


class Version(enum.Enum):
    """Which header a listener takes; the values are what a configuration would say."""

    V1 = "v1"
    V2 = "v2"
    ANY = "any"


class Command(enum.Enum):
    LOCAL = "local"  # the balancer's own connection (a health check): no client behind it
    PROXY = "proxy"  # relayed for a client; its addresses follow unless the family is unknown


class Family(enum.Enum):
    UNSPEC = "unspec"  # v1 UNKNOWN, v2 UNSPEC, and every LOCAL header: no addresses
    TCP4 = "tcp4"
    TCP6 = "tcp6"
    UNIX = "unix"  # v2 UNIX stream: accepted, addresses not reported


class NeedMore(enum.Enum):
    NEED_MORE = "need more"


NEED_MORE = NeedMore.NEED_MORE
# Read once per header: globals, as reading an Enum member from its class is slow.
_V1_ONLY, _V2_ONLY = Version.V1, Version.V2
_COMMAND_PROXY, _FAMILY_TCP4 = Command.PROXY, Family.TCP4

Address = tuple[str, int]  # (IP text as ipaddress prints it, port)


class ProxyHeader(NamedTuple):  # a tuple: built once per connection, cheaply
    """A whole header. `source` and `destination` are None when the caller should use the
    real endpoints: LOCAL, v1 UNKNOWN, v2 UNSPEC and UNIX."""

    consumed: int  # header bytes from `start`; SMTP begins right after them
    command: Command
    family: Family
    source: Address | None
    destination: Address | None
    version: int  # 1 or 2, for logs and counters


Result = ProxyHeader | NeedMore


class ProxyError(Exception):
    """The bytes cannot be a header the listener accepts; the caller closes the connection."""

    def __init__(self, reason: str) -> None:
        assert reason in REASONS, reason
        super().__init__(reason)
        self.reason = reason


def trusted(peer_ip: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
            ) -> bool:
    """Whether a peer may send a header: its address lies in one of `networks`.

    An IPv4-mapped peer (a dual-stack socket's view of an IPv4 client) is checked as the
    IPv4 address it maps; text that is not an address is never trusted.
    """
    try:
        ip = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def parse(data: bytes | bytearray | memoryview, start: int, end: int,
          accept: Version) -> Result:
    """The header at `data[start:end]`, NEED_MORE, or ProxyError (see the module docstring)."""
    if not 0 <= start <= end <= len(data):
        raise ValueError(f"bad bounds [{start}, {end}) for {len(data)} bytes")
    if end - start >= TCP4_BYTES and accept is not _V1_ONLY and data[
            start:start + V2_HEADER_BYTES] == _TCP4_PLAIN:
        # HAProxy's send-proxy-v2 for an IPv4 client, decoded in one step (see below).
        a, b, c, d, e, f, g, h, sport, dport = _TCP4_FIELDS.unpack_from(
            data, start + V2_HEADER_BYTES)
        o = _OCTETS
        return _new_header(ProxyHeader, (TCP4_BYTES, _COMMAND_PROXY, _FAMILY_TCP4,
                                         (f"{o[a]}.{o[b]}.{o[c]}.{o[d]}", sport),
                                         (f"{o[e]}.{o[f]}.{o[g]}.{o[h]}", dport), 2))
    if isinstance(data, memoryview):
        window = bytes(data[start:min(end, start + MAX_HEADER_BYTES)])
        data, start, end = window, 0, len(window)
    if start == end:
        return NEED_MORE
    first = data[start]
    if first == _V1_FIRST and accept is not _V2_ONLY:
        return _parse_v1(data, start, end)
    if first == _V2_FIRST and accept is not _V1_ONLY:
        return _parse_v2(data, start, end)
    if first in (V1_PREFIX[0], V2_SIGNATURE[0]):
        raise ProxyError("unsupported version")  # the other version's first byte
    raise ProxyError("not a proxy header")


def _begins(data: bytes | bytearray, start: int, end: int, prefix: bytes) -> bool:
    """Whether the bytes present agree with `prefix` as far as both go."""
    n = min(end - start, len(prefix))
    return data.startswith(prefix[:n], start)


# -- version 1 -----------------------------------------------------------------------

_V1_PROTOCOLS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r\n")
# Bytes a TCP4/TCP6 line may hold after its protocol word (CR only as the end). Checked
# before the CRLF arrives, and again on the whole line so the reason for a bad byte does
# not depend on how the line was split.
_V1_FIELD_CHARS = {
    b"TCP4 ": b"0123456789. \r",
    b"TCP6 ": b"0123456789abcdefABCDEF:. \r",
}


def _parse_v1(data: bytes | bytearray, start: int, end: int) -> Result:
    stop = min(end, start + V1_MAX_BYTES)
    if not _begins(data, start, stop, b"PROXY"):
        raise ProxyError("not a proxy header")
    if not _begins(data, start, stop, V1_PREFIX):
        raise ProxyError("bad v1 header")  # "PROXY" then something other than one space
    word_at = start + len(V1_PREFIX)
    protocol = next((p for p in _V1_PROTOCOLS if _begins(data, word_at, stop, p)), None)
    if protocol is None and word_at < stop:
        raise ProxyError("bad v1 header")
    lf = data.find(b"\n", start, stop)
    cr = data.find(b"\r", start, stop)
    line_end = stop if lf < 0 else lf  # the shape is checked up to the line's end only
    if (lf >= 0 and cr != lf - 1) or (lf < 0 and 0 <= cr < stop - 1):
        raise ProxyError("bad v1 header")  # a bare LF, or a CR not followed by LF
    if protocol in _V1_FIELD_CHARS:
        fields_at = word_at + len(protocol)
        fields = data[fields_at:line_end]  # at most 107 bytes of a header, not the buffer
        if fields.translate(None, _V1_FIELD_CHARS[protocol]) or fields.startswith(b" ") \
                or b"  " in fields or fields.count(b" ") > 3:
            raise ProxyError("bad v1 header")
    if lf >= 0:
        return _decode_v1(data, start, cr, protocol)
    if stop - start >= V1_MAX_BYTES:
        raise ProxyError("v1 header too long")
    return NEED_MORE


def _decode_v1(data: bytes | bytearray, start: int, cr: int, protocol: bytes | None
               ) -> ProxyHeader:
    """The line `data[start:cr]`, CRLF at `cr`, whose shape has been checked."""
    consumed = cr + 2 - start
    if protocol is None:  # "PROXY \r\n"; a partial word ("PROXY TCP\r\n") fails earlier
        raise ProxyError("bad v1 header")
    if protocol.startswith(b"UNKNOWN"):
        return ProxyHeader(consumed, Command.PROXY, Family.UNSPEC, None, None, 1)
    fields = bytes(data[start + len(V1_PREFIX) + len(protocol):cr]).split(b" ")
    if len(fields) != 4:
        raise ProxyError("bad v1 header")
    family = Family.TCP4 if protocol == b"TCP4 " else Family.TCP6
    src, dst = _v1_address(fields[0], family), _v1_address(fields[1], family)
    sport, dport = _v1_port(fields[2]), _v1_port(fields[3])
    return ProxyHeader(consumed, Command.PROXY, family, (src, sport), (dst, dport), 1)


def _v1_address(field: bytes, family: Family) -> str:
    try:
        text = field.decode("ascii")
        if family is Family.TCP4:
            return str(ipaddress.IPv4Address(text))  # refuses leading zeros (octal)
        if "%" in text:
            raise ValueError("an IPv6 zone means nothing off the sender's host")
        return _unmapped(ipaddress.IPv6Address(text))
    except ValueError:  # UnicodeDecodeError and ipaddress's errors are ValueErrors
        raise ProxyError("bad address") from None


def _v1_port(field: bytes) -> int:
    # Decimal, 0..65535, no leading zero: "0" is zero, "080" is refused (the
    # specification forbids leading zeros lest they read as octal). isdigit() alone would
    # pass other digits than 0-9 in str, but these are bytes: ASCII digits only.
    if not field.isdigit() or len(field) > 5 or (len(field) > 1 and field[0] == 0x30):
        raise ProxyError("bad port")
    port = int(field)
    if port > 0xFFFF:
        raise ProxyError("bad port")
    return port


# -- version 2 -----------------------------------------------------------------------

_LOCAL, _PROXY = 0x0, 0x1
# Family/protocol bytes the specification defines, with their address block's size.
_V2_FAMILIES = {
    0x00: 0,  # UNSPEC
    0x11: 12, 0x12: 12,  # TCP, UDP over IPv4: two 4-byte addresses, two ports
    0x21: 36, 0x22: 36,  # TCP, UDP over IPv6: two 16-byte addresses, two ports
    0x31: 216, 0x32: 216,  # UNIX stream, datagram: two 108-byte paths
}
# Those a relayed SMTP connection may come from.
_V2_PROXY_FAMILIES = {0x00: Family.UNSPEC, 0x11: Family.TCP4, 0x21: Family.TCP6,
                      0x31: Family.UNIX}


def _parse_v2(data: bytes | bytearray, start: int, end: int) -> Result:
    n = end - start
    if not _begins(data, start, end, V2_SIGNATURE):
        raise ProxyError("not a proxy header")
    if n <= 12:
        return NEED_MORE
    version_command = data[start + 12]
    if version_command >> 4 != 2:
        raise ProxyError("bad v2 version")
    command = version_command & 0x0F
    if command not in (_LOCAL, _PROXY):
        raise ProxyError("bad v2 command")
    if n <= 13:
        return NEED_MORE
    family_byte = data[start + 13]
    if family_byte not in _V2_FAMILIES or (
            command == _PROXY and family_byte not in _V2_PROXY_FAMILIES):
        raise ProxyError("bad v2 family")
    if n < V2_HEADER_BYTES:
        return NEED_MORE
    length = data[start + 14] << 8 | data[start + 15]
    total = V2_HEADER_BYTES + length
    if total > V2_MAX_BYTES:
        raise ProxyError("v2 header too long")
    if command == _LOCAL:
        if n < total:
            return NEED_MORE
        return ProxyHeader(total, Command.LOCAL, Family.UNSPEC, None, None, 2)
    address_bytes = _V2_FAMILIES[family_byte]
    if length < address_bytes:
        raise ProxyError("v2 length too short for its family")
    family = _V2_PROXY_FAMILIES[family_byte]
    if family is not Family.UNSPEC:
        _walk_tlvs(data, start + V2_HEADER_BYTES + address_bytes, start + total, end)
    if n < total:
        return NEED_MORE
    if family is Family.TCP4 or family is Family.TCP6:
        return _decode_v2_inet(data, start + V2_HEADER_BYTES, total, family)
    return ProxyHeader(total, Command.PROXY, family, None, None, 2)


# What HAProxy's send-proxy-v2 sends for an IPv4 client: PROXY, TCP over IPv4, no TLVs.
# Its 16 fixed bytes settle every check of the general way, so `parse` decodes it in one
# step, and makes its ProxyHeader without the named tuple's __new__ (a Python call).
_TCP4_PLAIN = V2_SIGNATURE + bytes((0x21, 0x11, 0x00, 12))
TCP4_BYTES = V2_HEADER_BYTES + 12
_TCP4_FIELDS = struct.Struct("!8BHH")  # source and destination octets, then the ports
# Each octet's decimal text, made once: dotted decimal (what ipaddress prints) is then a
# join of four strings, half the cost of formatting four numbers.
_OCTETS = tuple(str(octet) for octet in range(256))
_new_header = tuple.__new__
_TCP4_SOURCE = struct.Struct("!4B4xH")  # the source's octets and port, past the 16 bytes


def haproxy_tcp4_source(data: bytearray, end: int) -> Address | None:
    """The client of the header HAProxy's send-proxy-v2 sends for an IPv4 client (PROXY,
    TCP over IPv4, no TLVs) when it lies whole at the start of `data[:end]`; else None,
    and `parse` judges the bytes. The header is `TCP4_BYTES` long; its destination is
    not decoded (no caller uses it). A listener taking only version 1 must not ask."""
    if end < TCP4_BYTES or not data.startswith(_TCP4_PLAIN):
        return None
    a, b, c, d, port = _TCP4_SOURCE.unpack_from(data, V2_HEADER_BYTES)
    o = _OCTETS
    return f"{o[a]}.{o[b]}.{o[c]}.{o[d]}", port


def _walk_tlvs(data: bytes | bytearray, pos: int, header_end: int, end: int) -> None:
    """Check the TLVs in [pos, header_end) as far as `end`: each a type byte, a 16-bit
    length and that many bytes, ending exactly at the header's end."""
    while pos < header_end:
        if header_end - pos < 3:
            raise ProxyError("bad v2 tlv")  # too little room left for a TLV's own header
        if pos + 3 > end:
            return  # not here yet; checked on a later call
        pos += 3 + (data[pos + 1] << 8 | data[pos + 2])
        if pos > header_end:
            raise ProxyError("bad v2 tlv")


def _decode_v2_inet(data: bytes | bytearray, at: int, total: int, family: Family
                    ) -> ProxyHeader:
    size = 4 if family is Family.TCP4 else 16
    ports = at + 2 * size
    src = _v2_address(data[at:at + size])  # small fixed slices, inside the header
    dst = _v2_address(data[at + size:ports])
    sport = data[ports] << 8 | data[ports + 1]
    dport = data[ports + 2] << 8 | data[ports + 3]
    return ProxyHeader(total, Command.PROXY, family, (src, sport), (dst, dport), 2)


def _v2_address(packed: bytes | bytearray) -> str:
    if len(packed) == 4:  # what ipaddress prints, without its objects
        o = _OCTETS
        return f"{o[packed[0]]}.{o[packed[1]]}.{o[packed[2]]}.{o[packed[3]]}"
    return _unmapped(ipaddress.IPv6Address(bytes(packed)))


def _unmapped(ip: ipaddress.IPv6Address) -> str:
    mapped = ip.ipv4_mapped
    return str(mapped) if mapped is not None else str(ip)
