"""The arguments of MAIL and RCPT: paths and parameters (RFC 5321 4.1.2, RFC 1870, 6152,
6531). Pure functions of strings, for the protocol core.

Untrusted input: the text after the verb, decoded with surrogateescape (so bytes that
were not UTF-8 show up as surrogates and are refused here). Every problem raises
ArgumentError carrying the reply to send; nothing else can escape.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from minismtp.smtp import replies
from minismtp.smtp.replies import Reply

# RFC 5321 4.1.2 Path, leniently: quoted local parts may hold spaces and ">".
_PATH = re.compile(r'<((?:"(?:[^"\\]|\\.)*"|[^<>"\s])*)>')
_MAX_PATH_OCTETS = 256  # RFC 5321 4.5.3.1.3, brackets included
_SIZE_DIGITS = re.compile(r"[0-9]{1,20}")  # RFC 1870: ASCII digits only
# RFC 3461 4: xtext, printable ASCII but "+" and "=", which "+XX" (upper-case hex) encodes;
# "<>" (no identity) fits it too.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")


class ArgumentError(Exception):
    """A command argument is malformed; carries the reply to send."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


def parse_path(arg: str, prefix: str, bad: Reply) -> tuple[str, list[str]]:
    """Split "FROM:<a@b> X=Y" into ("a@b", ["X=Y"]); source routes are dropped."""
    head = arg[: len(prefix)]
    if not head.isascii() or head.upper() != prefix:  # "TO:" in ASCII letters only
        raise ArgumentError(replies.MAIL_SYNTAX if prefix == "FROM:" else replies.RCPT_SYNTAX)
    rest = arg[len(prefix):].lstrip(" ")
    m = _PATH.match(rest)
    if m is None:
        raise ArgumentError(bad)
    end = m.end()
    if end < len(rest) and rest[end] != " ":
        raise ArgumentError(bad)
    address = m.group(1)
    if address.startswith("@"):  # RFC 5321 4.1.2 / C: accept and ignore a source route
        _, colon, address = address.partition(":")
        if not colon or not address:  # a route must lead to a mailbox
            raise ArgumentError(bad)
    if not address.isprintable():  # no controls; spaces only get here inside quotes
        raise ArgumentError(bad)
    try:
        octets = len(address.encode())  # surrogates stand for bytes that were not UTF-8
    except UnicodeEncodeError:
        raise ArgumentError(bad) from None
    if octets + 2 > _MAX_PATH_OCTETS:
        raise ArgumentError(bad)
    # Parameters are separated by spaces only (RFC 5321 4.1.2 SP): not by the no-break
    # space or the other characters str.split() would take for whitespace.
    return address, [param for param in rest[end:].split(" ") if param]


# Paths already checked, by argument text: a client sends the same sender and recipients
# again and again (a load test, a mailing), and a hit skips two regexes and the checks.
# Only valid paths are kept, at most _MAX_REMEMBERED per table, so hostile input can
# only refill a small table.
_SENDERS: dict[str, tuple[str, tuple[str, ...]]] = {}
_RECIPIENTS: dict[str, tuple[str, tuple[str, ...]]] = {}
_MAX_REMEMBERED = 512


def sender_path(arg: str) -> tuple[str, tuple[str, ...]]:
    """MAIL's argument as (sender, parameters): "" for the null sender <>."""
    known = _SENDERS.get(arg)
    if known is None:
        sender, params = parse_path(arg, "FROM:", replies.BAD_SENDER)
        if sender and not is_mailbox(sender):
            raise ArgumentError(replies.BAD_SENDER)
        known = _remember(_SENDERS, arg, sender, params)
    return known


def recipient_path(arg: str) -> tuple[str, tuple[str, ...]]:
    """RCPT's argument as (recipient, parameters): a mailbox or "postmaster"."""
    known = _RECIPIENTS.get(arg)
    if known is None:
        recipient, params = parse_path(arg, "TO:", replies.BAD_RECIPIENT)
        if not (is_mailbox(recipient) or recipient.lower() == "postmaster"):
            raise ArgumentError(replies.BAD_RECIPIENT)
        known = _remember(_RECIPIENTS, arg, recipient, params)
    return known


def _remember(table: dict[str, tuple[str, tuple[str, ...]]], arg: str, path: str,
              params: list[str]) -> tuple[str, tuple[str, ...]]:
    if len(table) >= _MAX_REMEMBERED:
        table.clear()  # cheaper than tracking age; a steady client refills it at once
    table[arg] = known = (path, tuple(params))
    return known


def is_mailbox(address: str) -> bool:
    """local@domain, with neither part empty and no empty domain label at the start."""
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain) and not domain.startswith(".") and ".." not in domain


def parse_mail_parameters(params: Sequence[str], *,
                          auth: bool = False) -> tuple[int | None, str | None, bool]:
    """(SIZE, BODY, SMTPUTF8) from MAIL's parameters; each may be given once. With
    `auth` (AUTH offered) an AUTH=<xtext> parameter is checked and ignored: it names
    who submitted a relayed message (RFC 4954 5), and nothing here relays."""
    size, body, smtputf8, seen_auth = None, None, False, False
    for param in params:
        key, eq, value = param.partition("=")
        key = key.upper() if key.isascii() else "?"  # "ſIZE" is not SIZE
        if key == "SIZE" and eq and size is None and _SIZE_DIGITS.fullmatch(value):
            size = int(value)
        elif key == "BODY" and eq and body is None and value.isascii() \
                and value.upper() in ("7BIT", "8BITMIME"):
            body = value.upper()
        elif key == "SMTPUTF8" and not eq and not smtputf8:
            smtputf8 = True
        elif key == "AUTH" and auth and eq and not seen_auth and _XTEXT.fullmatch(value):
            seen_auth = True
        elif key in ("SIZE", "BODY", "SMTPUTF8") or (key == "AUTH" and auth):
            raise ArgumentError(replies.BAD_PARAMETER_VALUE)
        else:
            raise ArgumentError(replies.UNKNOWN_PARAMETER)
    return size, body, smtputf8
