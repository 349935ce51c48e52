"""PROXY protocol headers as a load balancer sends them (HAProxy `send-proxy` and
`send-proxy-v2`), for tests to put before their SMTP bytes.

Independent of minismtp's parser: built from the specification's layout with `struct`
and `ipaddress`, so a test that round-trips through the parser checks one against the
other. Addresses are (ip text, port); both must be of one family.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

# Version 2 family/protocol bytes.
UNSPEC, TCP4, UDP4, TCP6, UDP6, UNIX_STREAM, UNIX_DGRAM = (
    0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32)
LOCAL, PROXY = 0x20, 0x21  # version 2 in the high nibble, the command in the low one

# A few registered TLV types, for tests that want realistic ones.
PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_NOOP, PP2_TYPE_UNIQUE_ID = 0x01, 0x02, 0x04, 0x05

Address = tuple[str, int]


def v1(src: Address | None, dst: Address | None) -> bytes:
    """`PROXY TCP4|TCP6 src dst sport dport\\r\\n`, or `PROXY UNKNOWN\\r\\n` without addresses."""
    if src is None or dst is None:
        return b"PROXY UNKNOWN\r\n"
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if s.version != d.version:
        raise ValueError("source and destination must be of one family")
    proto = "TCP4" if s.version == 4 else "TCP6"
    return f"PROXY {proto} {s} {d} {src[1]} {dst[1]}\r\n".encode("ascii")


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def v2(src: Address | None, dst: Address | None, tlvs: Iterable[tuple[int, bytes]] = (),
       *, command: int = PROXY, family: int | None = None) -> bytes:
    """A binary header. Without addresses: UNSPEC (or `family`, with an empty block)."""
    body = b""
    if src is not None and dst is not None:
        s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
        if s.version != d.version:
            raise ValueError("source and destination must be of one family")
        body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
        if family is None:
            family = TCP4 if s.version == 4 else TCP6
    body += b"".join(tlv(kind, value) for kind, value in tlvs)
    return v2_raw(command, UNSPEC if family is None else family, body)


def v2_raw(version_command: int, family: int, body: bytes, length: int | None = None) -> bytes:
    """Any v2 header, well formed or not: `length` defaults to the body's true length."""
    size = len(body) if length is None else length
    return SIGNATURE + struct.pack("!BBH", version_command, family, size) + body


def local_v2(tlvs: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """What HAProxy sends on its own health checks with send-proxy-v2."""
    return v2(None, None, tlvs, command=LOCAL)
