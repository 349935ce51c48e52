"""Untrusted envelope strings made safe for Maildir: header text and path components.

Untrusted input (SECURITY): the HELO name, sender and recipients come from the client.
- Trace headers: control characters (CR, LF, TAB, NUL, DEL, C1, U+2028/9) become "?", so
  a hostile HELO or address can never start a header line of its own. Beyond that each
  client string may only hold what its place allows, the rest becoming "?" (as Postfix
  prints unprintables): the HELO name letters, digits and ".-_[]:" (a domain or an address
  literal), so spaces, parentheses and semicolons cannot forge a `from` clause, comment or
  date; an address the characters of a mailbox (RFC 5322 atext, ".@[]:", and quoted
  strings kept whole, quotes balanced). Outside SMTPUTF8 every header byte is ASCII, so a
  non-ASCII HELO name becomes "?" there too (RFC 6532 allows UTF-8 only with SMTPUTF8).
- Directory names (layout "per_recipient"): each component is percent-encoded outside
  [A-Za-z0-9._+-], never "", "." or "..", never hidden, capped with a hash suffix
  (maildir.py then checks with realpath that the directory lies inside delivery.path).
- The host part of file names (this machine's name, which may hold "/" or ":"): unsafe
  bytes become octal escapes.
"""

from __future__ import annotations

import hashlib
import re
from email.utils import formatdate

from ..smtp.events import Envelope
from .base import Peer

_MAX_COMPONENT = 200  # bytes; NAME_MAX is 255 on common filesystems
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+-")
_PERCENT = tuple(chr(b) if b in _SAFE else f"%{b:02X}" for b in range(256))
_RESERVED_DOMAINS = frozenset({"tmp", "new", "cur", "_local"})  # names we use ourselves
_LOCAL_DOMAIN = "_local"  # folder for a bare "postmaster" (RFC 5321 section 4.1.1.3)


def _to_bytes(text: str) -> bytes:
    """Encode envelope text, restoring raw bytes the core kept as surrogate escapes."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _clean(text: str) -> str:
    return _CONTROL.sub("?", text)


_HELO_ASCII = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_[]:")
_ATEXT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                   "!#$%&'*+-/=?^_`{|}~.@[]:")  # RFC 5322 atext, plus what joins a mailbox
_QTEXT = frozenset(chr(c) for c in range(0x20, 0x7F))  # inside quotes: printable, space too
# A quoted string (quotes balanced, escapes kept), a run of anything else, or a stray quote.
_ADDRESS_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[^"]+|"', re.DOTALL)


def _only(text: str, allowed: frozenset[str], utf8: bool) -> str:
    """`text` with every character outside `allowed` as "?"; with `utf8`, non-ASCII
    characters that print and are not spaces are kept too (RFC 6532)."""
    if text.isascii() and allowed.issuperset(text):
        return text  # the usual case, without a loop
    return "".join([
        ch if ch in allowed or (utf8 and ch > "\x7f" and ch.isprintable() and not ch.isspace())
        else "?" for ch in text])


_MAX_HELO_OCTETS = 255  # a domain's limit (RFC 5321 4.5.3.1.2), and a header line's share


def helo_text(name: str, utf8: bool) -> str:
    """The client's HELO name as one token of a `from` clause, never "" (RFC 5321 4.4),
    cut to 255 octets: the command line limit can be raised far past it, and a header
    line must stay within 998 (RFC 5322 2.1.1)."""
    text = _only(name, _HELO_ASCII, utf8) or "unknown"
    if len(text) > _MAX_HELO_OCTETS // 4 and len(encoded := text.encode()) > _MAX_HELO_OCTETS:
        text = encoded[:_MAX_HELO_OCTETS].decode(errors="ignore")  # a whole character
    return text


def address_text(address: str, utf8: bool) -> str:
    """An envelope address for <...> in a header: quoted strings stay whole (their
    quotes and escapes intact), anything outside a mailbox's characters becomes "?"."""
    if address.isascii() and _ATEXT.issuperset(address):
        return address
    out = []
    for token in _ADDRESS_TOKEN.findall(address):
        if len(token) > 1 and token[0] == '"':
            out.append('"' + _only(token[1:-1], _QTEXT, utf8) + '"')
        else:
            out.append(_only(token, _ATEXT, utf8))
    return "".join(out)


def _component(text: str) -> str:
    """One safe, non-empty path component that is never "." or ".." nor hidden."""
    raw = _to_bytes(text)
    out = "".join([_PERCENT[b] for b in raw])
    if not out:
        return "%"  # "%" alone is never produced by encoding, so it cannot collide
    if out[0] == ".":
        out = "%2E" + out[1:]
    if len(out) > _MAX_COMPONENT:
        # "~" is always percent-encoded above, so a hashed name cannot collide with a plain one
        out = out[: _MAX_COMPONENT - 17] + "~" + hashlib.sha256(raw).hexdigest()[:16]
    return out


def mailbox_parts(recipient: str) -> tuple[str, str]:
    """Map a recipient to (domain folder, local-part folder), both safe path components.

    The domain is case-insensitive and lower-cased; the local part keeps its case
    (RFC 5321 section 2.4). A recipient without "@" goes to the "_local" folder.
    """
    local, at, domain = recipient.rpartition("@")
    if not at:
        return _LOCAL_DOMAIN, _component(recipient.lower())
    folder = _component(domain.lower())
    if folder in _RESERVED_DOMAINS:
        folder = f"%{ord(folder[0]):02X}{folder[1:]}"
    return folder, _component(local)


def encode_host(host: str) -> str:
    """Host part of a Maildir name: "/" -> "\\057", ":" -> "\\072", any other unsafe byte too."""
    out = "".join([chr(b) if b in _SAFE else f"\\{b:03o}" for b in _to_bytes(host)])
    return out[:100] or "localhost"


def trace_headers(envelope: Envelope, peer: Peer, hostname: str, queue_id: str,
                  when_s: float, delivered_to: tuple[str, ...] | None = None,
                  for_clause: bool = True) -> bytes:
    """Return-Path, one Delivered-To per address of `delivered_to` (None: every
    recipient), and Received (RFC 5321 section 4.4), whose "for" clause names a sole
    recipient unless `for_clause` is false. Lines end in CRLF, as on the wire (the sink
    changes them with the body's when delivery.line_endings says so)."""
    utf8 = envelope.smtputf8
    lines = [f"Return-Path: <{address_text(envelope.sender, utf8)}>"]
    if delivered_to is None:
        delivered_to = envelope.recipients
    lines += [f"Delivered-To: {address_text(rcpt, utf8)}" for rcpt in delivered_to]
    # RFC 6531 section 4.3 registers "UTF8SMTP" for ESMTP with SMTPUTF8
    protocol = "UTF8SMTP" if envelope.smtputf8 else "ESMTP" if envelope.esmtp else "SMTP"
    if envelope.tls is not None and envelope.esmtp:  # RFC 3848 ESMTPS, RFC 6531 UTF8SMTPS
        protocol += "S"
    # RFC 3848 ESMTPA/ESMTPSA, RFC 6531 UTF8SMTPA/UTF8SMTPSA. Who authenticated is for the
    # log only: a header would show the account name to every reader of the message.
    if envelope.authenticated_as is not None and envelope.esmtp:
        protocol += "A"
    # Postfix's comment: "(using TLSv1.3 with cipher ... (256/256 bits))", from tls.describe()
    using = f"\t(using {_clean(envelope.tls)})\r\n" if envelope.tls else ""
    address = _clean(peer.address)
    literal = f"[IPv6:{address}]" if ":" in address else f"[{address}]"
    received = (
        f"Received: from {helo_text(envelope.helo, utf8)} ({literal})\r\n"
        f"{using}\tby {_clean(hostname)} (minismtp) with {protocol} id {queue_id}"
    )
    date = formatdate(when_s, localtime=True)
    if len(envelope.recipients) == 1 and for_clause:
        rcpt = address_text(envelope.recipients[0], utf8)
        if "@" not in rcpt:  # <postmaster>: "for" takes a mailbox (RFC 5321 4.4), ours
            rcpt += f"@{_clean(hostname)}"
        received += f"\r\n\tfor <{rcpt}>; {date}"
    else:
        received += f";\r\n\t{date}"
    lines.append(received)
    lines.append("")
    return _to_bytes("\r\n".join(lines))
