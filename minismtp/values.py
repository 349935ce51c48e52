"""Parsers for configuration values: raw YAML value -> typed value, or a ValueError
whose text ("must be ..., got ...") follows the key path in the problem line.

Untrusted input: values from the operator's YAML file and command line; every parser
bounds what it accepts (digit counts, lengths) and raises nothing but ValueError.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

Parser = Callable[[Any], Any]


class ItemProblems(ValueError):
    """Problems with items of a list value, as (index, message); reported as key[index]."""

    def __init__(self, items: list[tuple[int, str]]) -> None:
        super().__init__("; ".join(message for _, message in items))
        self.items = items


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str  # an IP literal in canonical form, or a host name
    port: int  # 0 = any free port
    family: socket.AddressFamily  # AF_INET6 for IPv6 literals; names are bound as AF_INET

    def __str__(self) -> str:
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


TLS_MODES = ("none", "starttls", "implicit")


AUTH_MODES = ("off", "accept_any", "htpasswd")


@dataclass(frozen=True, slots=True)
class ListenerAuth:
    """A listener's `auth` mapping: whether AUTH (RFC 4954) is offered and how passwords
    are checked. `users` is the `htpasswd.Users` of `users_file`, loaded and checked by
    `config.load_config` (None until then, and for the other modes); it compares by
    content, so a reload notices a changed users file."""

    mode: str = "off"  # off | accept_any (every password: load tests) | htpasswd
    users_file: str | None = None  # htpasswd -B file; needed by, and only by, htpasswd
    require: bool = False  # MAIL needs a successful AUTH first
    allow_plaintext: bool = False  # offer AUTH before TLS is up (passwords in the clear)
    users: Any = field(default=None, repr=False)

    @property
    def offered(self) -> bool:
        return self.mode != "off"


PROXY_VERSIONS = ("v1", "v2", "any")


@dataclass(frozen=True, slots=True)
class ProxyProtocol:
    """A listener's `proxy_protocol` mapping: its connections come from a load balancer
    that sends a PROXY header first (`version` of it), and only from the `trusted`
    networks; a connection from elsewhere is closed unread."""

    version: str  # one of PROXY_VERSIONS
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@dataclass(frozen=True, slots=True)
class Listener:
    """One `server.listen` entry: an address and how its connections use TLS.

    Written as a string (the address, default TLS mode) or a mapping of the keys in
    `LISTENER_KEYS`. `tls` is None only between parsing and `config.load_config`, which
    resolves it: "starttls" when tls.certificates are set, else "none". The address's
    `host`, `port`, `family` and `str()` are the listener's own, so code that binds or
    names a listener treats it as its address.
    """

    address: ListenAddress
    tls: str | None = None  # one of TLS_MODES
    require_tls: bool = False  # STARTTLS listeners: MAIL, RCPT, DATA need TLS first
    auth: ListenerAuth = ListenerAuth()  # frozen: one shared default is safe
    proxy_protocol: ProxyProtocol | None = None  # a PROXY header comes first (proxyread.py)
    # Its profile (profiles.py): a name for logs and stats ("" here: the address), and
    # what it overrides of server.hostname, the limits section (key, value) and faults.
    name: str = ""
    hostname: str | None = None
    limits: tuple[tuple[str, Any], ...] = ()
    faults: tuple[tuple[str, Any], ...] = ()  # faults keys given (seed, rules); the rest: top's

    def __post_init__(self) -> None:
        if not self.name:  # frozen: set once, here
            object.__setattr__(self, "name", str(self.address))

    @property
    def client_speaks_first(self) -> bool:
        """Its connections begin with the client's bytes (a PROXY header, a ClientHello),
        not with our greeting: listeners.py lets the kernel hold them until those come."""
        return self.proxy_protocol is not None or self.tls == "implicit"

    @property
    def host(self) -> str:
        return self.address.host

    @property
    def port(self) -> int:
        return self.address.port

    @property
    def family(self) -> socket.AddressFamily:
        return self.address.family

    def __str__(self) -> str:
        return str(self.address)


@dataclass(frozen=True, slots=True)
class CertificatePair:
    cert: str  # PEM certificate, then its chain
    key: str  # PEM private key, unencrypted


class PathProblems(ValueError):
    """Problems below a setting, as (path such as "[1].tls", message)."""

    def __init__(self, items: list[tuple[str, str]], partial: object = None) -> None:
        super().__init__("; ".join(f"{path}: {message}" for path, message in items))
        self.items = items
        # What did parse, for the checks between values to look at too (listen_list:
        # the listeners, None in place of each bad one), so that every problem is
        # reported at once; None: nothing.
        self.partial = partial


def got(value: object) -> str:
    """Show a bad value the way the operator wrote it in YAML, briefly."""
    if isinstance(value, str):  # quoted, control characters and lone surrogates escaped
        short = value if len(value) <= 60 else value[:57] + "..."
        shown = json.dumps(short, ensure_ascii=False)
        return shown.encode("utf-8", "backslashreplace").decode("utf-8")
    if value is None or isinstance(value, bool):  # bool before int: True is an int
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int) and value.bit_length() > 128:  # repr() refuses > 4300 digits
        return "a very large integer"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple, Mapping)):
        kind = "mapping" if isinstance(value, Mapping) else "list"
        return f"a {kind}" if value else f"an empty {kind}"
    return f"a {type(value).__name__}"  # e.g. YAML 1.1 reads 2024-01-01 as a date


def suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


# Parsers: raw value -> typed value, or ValueError("must be ..., got ...").

_DIGITS = re.compile(r"[0-9]{1,20}", re.ASCII)  # bounded: int() refuses > 4300 digits


class OctalInt(int):
    """An integer written in octal in the YAML file (`0640`; YAML 1.1 reads a leading 0
    as octal). config's loader makes these so that a mode can tell `0640` from `640`,
    which YAML reads as decimal; parsers hand on plain ints."""

    __slots__ = ()


def as_int(value: object) -> int | None:
    """An int from an int, a whole float or a digit string (command-line values are text)."""
    if isinstance(value, bool):  # YAML `true` must not pass as 1
        return None
    if isinstance(value, int):
        return int(value)  # a plain int, whatever the loader made
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return int(value) if isinstance(value, str) and _DIGITS.fullmatch(value) else None


def integer(low: int, high: int | None = None) -> Parser:
    want = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(value: object) -> int:
        number = as_int(value)
        if number is None or number < low or (high is not None and number > high):
            raise ValueError(f"must be {want}, got {got(value)}")
        return number

    return parse


# The master's heartbeat board has 2 * MAX_WORKERS slots: a generation being retired and
# the new one a reload starts must fit side by side.
MAX_WORKERS = 512


def file_mode(owner: int) -> Parser:
    """Permission bits: an octal string ("0640", "640", "0o640") or an integer written in
    octal in the file (an unquoted 0640); at most 0777, and with every bit of `owner` (the
    owner must be able to write what it makes). An unquoted 640 is refused: YAML reads it
    as decimal, 0o1200, and 470 would be 0o726, world-writable."""
    example = f"{0o640 if owner == 0o600 else 0o750:04o}"
    want = f'an octal mode such as "{example}", from "{owner:04o}" to "0777" and with ' \
           f'the owner\'s "{owner:04o}"'

    def parse(value: object) -> int:
        number = None
        if isinstance(value, str):  # octal, whatever its first digit
            text = value.strip().lower().removeprefix("0o")
            if text and len(text) <= 4 and all(c in "01234567" for c in text):
                number = int(text, 8)
        elif isinstance(value, OctalInt):
            number = int(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f'must be written in octal and quoted, such as "{example}", '
                             f"got {got(value)}, which YAML reads as decimal")
        if number is None or not 0 <= number <= 0o777 or number & owner != owner:
            raise ValueError(f"must be {want}, got {got(value)}")
        return number

    return parse


def dump_mode(mode: int) -> str:
    return f"{mode:04o}"


def worker_count(value: object) -> int:
    if value == "auto":  # cpu_count() is None when it cannot tell
        return min(MAX_WORKERS, os.cpu_count() or 1)
    number = as_int(value)
    if number is None or number < 1:
        raise ValueError(f'must be an integer >= 1 or "auto", got {got(value)}')
    if number > MAX_WORKERS:
        raise ValueError(f"must be at most {MAX_WORKERS}, got {got(value)}")
    return number


def boolean(value: object) -> bool:
    # Real YAML booleans only: the string "false" is truthy, a classic silent misconfiguration.
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {got(value)}")
    return value


def boolean_or_auto(value: object) -> bool | None:
    """true, false, or "auto" (None: the program decides)."""
    if value == "auto":
        return None
    if not isinstance(value, bool):
        raise ValueError(f'must be true, false or "auto", got {got(value)}')
    return value


def choice(*options: str, fold_case: bool = False) -> Parser:
    listed = ", ".join(f'"{option}"' for option in options)

    def parse(value: object) -> str:
        text = value.lower() if fold_case and isinstance(value, str) else value
        if text not in options:
            raise ValueError(f"must be one of {listed}, got {got(value)}")
        return text

    return parse


def string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {got(value)}")
    return value


def file_path(value: object) -> str:
    """A file or directory name the OS can take: a NUL or text the file-system encoding
    cannot write (a lone surrogate such as "\\ud800") would raise ValueError wherever the
    path is used, at start or on a reload."""
    text = string(value)
    if "\0" in text:
        raise ValueError(f"must be a path without NUL characters, got {got(value)}")
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        raise ValueError(f"must be a path the file system's encoding "
                         f"({sys.getfilesystemencoding()}) can write, got {got(value)}"
                         ) from None
    return text


_PRINTABLE = re.compile(r"[\x21-\x7e]+", re.ASCII)
_CIPHERS = re.compile(r"[\x20-\x7e]+", re.ASCII)  # OpenSSL separates with ":", " ", ","


def cipher_string(value: object) -> str | None:
    """tls.ciphers: an OpenSSL cipher string, ASCII (ssl raises ValueError for a NUL, and
    for text it cannot encode); whether OpenSSL knows its ciphers is tls.py's check."""
    if value is None:
        return None
    if not isinstance(value, str) or not _CIPHERS.fullmatch(value):
        raise ValueError(f"must be an OpenSSL cipher string of printable ASCII or null, "
                         f"got {got(value)}")
    return value


_PAIR_KEYS = ("cert", "key")


def certificate_list(value: object) -> tuple[CertificatePair, ...]:
    """tls.certificates: a list of {cert, key} file paths (read and checked by tls.py)."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"must be a list of {{cert, key}} mappings, got {got(value)}")
    pairs, problems = [], []
    for index, item in enumerate(value):
        if not isinstance(item, Mapping):
            problems.append((f"[{index}]", f"must be a mapping with cert and key, got {got(item)}"))
            continue
        for key in item:
            if key not in _PAIR_KEYS:
                problems.append((f"[{index}].{key}",
                                 f"unknown key{suggest(str(key), list(_PAIR_KEYS))}"))
        paths = {}
        for key in _PAIR_KEYS:
            if key not in item:
                problems.append((f"[{index}]", f'missing key "{key}"'))
                continue
            try:
                paths[key] = file_path(item[key])
            except ValueError as exc:
                problems.append((f"[{index}].{key}", str(exc)))
        if len(paths) == 2:
            pairs.append(CertificatePair(**paths))
    if problems:
        raise PathProblems(problems)
    return tuple(pairs)


def printable_name(want: str, *, optional: bool = False, max_chars: int | None = None
                   ) -> Parser:
    # Host names go verbatim into the greeting and Received: headers: printable ASCII only.
    def parse(value: object) -> str | None:
        if optional and value is None:
            return None
        if not isinstance(value, str) or not _PRINTABLE.fullmatch(value):
            raise ValueError(f"must be {want}, got {got(value)}")
        if max_chars is not None and len(value) > max_chars:
            raise ValueError(f"must be {want}, at most {max_chars} characters, got "
                             f"{len(value)}: {got(value)}")
        return value

    return parse


# A DNS name has at most 253 characters (RFC 1035 2.3.4, written without the final dot);
# the name goes into the 220 and EHLO replies, whose lines RFC 5321 4.5.3.1.5 caps at 512.
MAX_HOST_NAME_CHARS = 253


def host_name() -> Parser:
    return printable_name("a host name of printable ASCII, no spaces",
                          max_chars=MAX_HOST_NAME_CHARS)


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?", re.ASCII | re.I)
_SECONDS_PER = {"s": 1, "m": 60, "h": 3600}


def to_seconds(value: object) -> float | None:
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
            number, unit = match[1], (match[2] or "s").lower()
            # Divide for ms: 9 / 1000 == 0.009, but 9 * 0.001 == 0.009000000000000001.
            seconds = float(number) / 1000 if unit == "ms" else float(number) * _SECONDS_PER[unit]
        else:
            return None
    except OverflowError:  # float() of a 400-digit YAML integer
        return None
    return seconds if math.isfinite(seconds) else None


def duration(*, allow_zero: bool, minimum_s: float = 0.0) -> Parser:
    if minimum_s:
        want = f'a duration of at least {dump_duration(minimum_s)} such as "30s" or "5m"'
    else:
        want = f'a duration {">=" if allow_zero else ">"} 0 such as "30s", "5m" or "500ms"'

    def parse(value: object) -> float:
        seconds = to_seconds(value)
        if seconds is None or seconds < minimum_s or (seconds == 0 and not allow_zero):
            raise ValueError(f"must be {want}, got {got(value)}")
        return seconds

    return parse


_SIZE = re.compile(r"([0-9]{1,20}(?:\.[0-9]{1,20})?)\s*(?:([kmgt])(?:i?b)?|b)?", re.A | re.I)
_SIZE_SHIFT = {None: 0, "k": 10, "m": 20, "g": 30, "t": 40}  # binary multiples, like Postfix


def size(value: object) -> int:
    size = as_int(value)
    if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        exact = Fraction(match[1]) * (1 << _SIZE_SHIFT[match[2] and match[2].lower()])
        size = int(exact) if exact.denominator == 1 else None  # "1.5M" yes, half a byte no
    if size is None or size < 1:
        raise ValueError(f'must be a size >= 1 such as 512, "64K" or "10M", got {got(value)}')
    return size


_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?", re.ASCII)
_NO_PORT = 'missing port (use "host:port" or "[v6addr]:port")'


def _listen_host(host: str, quoted: str) -> str:
    if not host:
        raise ValueError(f'missing host (use "0.0.0.0" or "[::]" for all), got {quoted}')
    if ":" in host:
        raise ValueError(f'IPv6 addresses need brackets, as in "[::1]:2525", got {quoted}')
    if re.fullmatch(r"[0-9.]+", host):  # looks like IPv4, so it must be valid IPv4
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"invalid IPv4 address, got {quoted}") from None
    if not _HOST_NAME.fullmatch(host):
        raise ValueError(f"invalid host name, got {quoted}")
    return host


def parse_listen(text: str) -> ListenAddress:
    """Parse "host:port" or "[v6addr]:port"; a ValueError says what is wrong in one line."""
    if not isinstance(text, str):
        raise ValueError(f'must be a "host:port" string, got {got(text)}')
    quoted = got(text)
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError(f'missing "]" after the IPv6 address, got {quoted}')
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address in brackets, got {quoted}") from None
        if ip.ipv4_mapped is not None:  # an IPv6-only socket cannot bind it (EINVAL)
            raise ValueError(f'is IPv4-mapped: write "{ip.ipv4_mapped}{rest}", got {quoted}')
        host = str(ip)  # canonical: [0::1] and [::1] are equal
        if not rest.startswith(":"):
            raise ValueError(f"{_NO_PORT}, got {quoted}")
        port_text, family = rest[1:], socket.AF_INET6
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"{_NO_PORT}, got {quoted}")
        host, family = _listen_host(host, quoted), socket.AF_INET
    if not _DIGITS.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {quoted}")
    return ListenAddress(host, int(port_text), family)


_WILDCARDS = ("0.0.0.0", "::")


def overlaps(first: ListenAddress, second: ListenAddress) -> bool:
    """Whether the two could not both be bound: one port of one family, on the same host
    or where either is the wildcard, which takes the port on every address of its family
    (IPv6 sockets are bound IPV6_V6ONLY, so "[::]" leaves IPv4 alone). Port 0 binds a free
    port: never. Host names are not resolved, so a name and an address may still clash."""
    if not first.port or (first.family, first.port) != (second.family, second.port):
        return False
    return first.host == second.host or first.host in _WILDCARDS or second.host in _WILDCARDS


# The keys a listener mapping may hold. Each parses its own value into a Listener field;
# the profile keys (name, hostname, limits, faults) join them in config.py (profiles.py).
_auth_mode_choice = choice(*AUTH_MODES)


def _auth_mode(value: object) -> str:
    # YAML 1.1 reads an unquoted `off` as false: take it as meant.
    return "off" if value is False else _auth_mode_choice(value)


_AUTH_KEYS: dict[str, Parser] = {
    "mode": _auth_mode,
    "users_file": file_path,
    "require": boolean,
    "allow_plaintext": boolean,
}


def parse_keys(value: Mapping, parsers: dict[str, Parser]
                ) -> tuple[dict[str, object], list[tuple[str, str]]]:
    """Each key of a sub-mapping (a listener's auth, limits.per_client) through its
    parser: (fields, problems), a problem per unknown or bad key, its path relative to
    the mapping (".mode")."""
    fields: dict[str, object] = {}
    problems: list[tuple[str, str]] = []
    for key, raw in value.items():
        key = str(key)
        if key not in parsers:
            problems.append((f".{key}", f"unknown key{suggest(key, [*parsers])}"))
            continue
        try:
            fields[key] = parsers[key](raw)
        except ValueError as exc:
            problems.append((f".{key}", str(exc)))
    return fields, problems


def listener_auth(value: object) -> ListenerAuth:
    """A listener's `auth` mapping; problems as PathProblems (".mode", ...)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping (mode, users_file, require, allow_plaintext), "
                         f"got {got(value)}")
    fields, problems = parse_keys(value, _AUTH_KEYS)
    if not problems:
        mode = fields.get("mode", "off")
        if mode == "htpasswd" and "users_file" not in fields:
            problems.append((".users_file", "needed by mode: htpasswd"))
        elif mode != "htpasswd" and "users_file" in fields:
            problems.append((".users_file", "only for mode: htpasswd"))
        if mode == "off" and fields.get("require"):
            problems.append((".require", "needs a mode other than off"))
    if problems:
        raise PathProblems(problems)
    return ListenerAuth(**fields)  # type: ignore[arg-type]


def dump_auth(auth: ListenerAuth) -> dict[str, object]:
    """What `listener_auth` reads back to an equal ListenerAuth (users loaded again)."""
    entry: dict[str, object] = {"mode": auth.mode}
    if auth.users_file is not None:
        entry["users_file"] = auth.users_file
    if auth.require:
        entry["require"] = True
    if auth.allow_plaintext:
        entry["allow_plaintext"] = True
    return entry


IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # how IPv6 writes IPv4 addresses


def mapped_network_problem(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """Why an IPv6 network of IPv4-mapped addresses is refused ("" for any other): an IPv4
    client is matched as IPv4 whatever form its address came in, so it would match none."""
    if network.version != 6 or not network.subnet_of(IPV4_MAPPED):  # type: ignore[arg-type]
        return ""
    ipv4 = ipaddress.IPv4Network((int(network.network_address) & 0xFFFFFFFF,
                                  network.prefixlen - 96))
    return f'IPv4-mapped, which matches no client (IPv4 ones are matched as IPv4): write "{ipv4}"'


def _networks(value: object) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f'must be a non-empty list of networks ("127.0.0.1/32"), '
                         f"got {got(value)}")
    networks = []
    for item in value:
        if not isinstance(item, str) or len(item) > 64:
            raise ValueError(f"must be networks in CIDR form, got {got(item)}")
        try:
            network = ipaddress.ip_network(item, strict=True)
        except ValueError:
            raise ValueError(f"not a network (host bits must be zero), got {got(item)}"
                             ) from None
        if problem := mapped_network_problem(network):
            raise ValueError(f"{got(item)} is {problem}")
        networks.append(network)
    return tuple(networks)


_PROXY_KEYS: dict[str, Parser] = {"version": choice(*PROXY_VERSIONS), "trusted": _networks}


def listener_proxy(value: object) -> ProxyProtocol:
    """A listener's `proxy_protocol` mapping; problems as PathProblems (".trusted", ...)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping (version, trusted), got {got(value)}")
    fields, problems = parse_keys(value, _PROXY_KEYS)
    if "trusted" not in fields and not any(path == ".trusted" for path, _ in problems):
        # No default: trusting everyone would let any client claim any address.
        problems.append((".trusted", "needed: the load balancers' networks"))
    if problems:
        raise PathProblems(problems)
    trusted = fields["trusted"]
    return ProxyProtocol(str(fields.get("version", "v2")), trusted)  # type: ignore[arg-type]


def dump_proxy(proxy: ProxyProtocol) -> dict[str, object]:
    return {"version": proxy.version, "trusted": [str(net) for net in proxy.trusted]}


LISTENER_KEYS: dict[str, tuple[str, Parser]] = {
    "tls": ("tls", choice(*TLS_MODES)),
    "require_tls": ("require_tls", boolean),
    "auth": ("auth", listener_auth),
    "proxy_protocol": ("proxy_protocol", listener_proxy),
}


def _listener(item: object, index: int, problems: list[tuple[str, str]],
              keys: dict[str, tuple[str, Parser]]) -> Listener | None:
    if not isinstance(item, Mapping):
        try:
            return Listener(parse_listen(item))  # a string, or a message naming the type
        except ValueError as exc:
            problems.append((f"[{index}]", str(exc)))
            return None
    fields: dict[str, object] = {}
    ok = True
    if "address" not in item:
        problems.append((f"[{index}]", 'missing key "address"'))
        ok = False
    for key, raw in item.items():
        key = str(key)
        where = f"[{index}].{key}"
        try:
            if key == "address":
                fields["address"] = parse_listen(raw)
            elif key in keys:
                name, parse = keys[key]
                fields[name] = parse(raw)
            else:
                problems.append((where, f"unknown key{suggest(key, ['address', *keys])}"))
                ok = False
        except PathProblems as exc:  # a mapping of its own (auth): each key's problem
            problems.extend((where + path, message) for path, message in exc.items)
            ok = False
        except ValueError as exc:
            problems.append((where, str(exc)))
            ok = False
    return Listener(**fields) if ok else None  # type: ignore[arg-type]


# The stats board keeps each listener's counters in a fixed place per worker (stats.py).
MAX_LISTENERS = 64


def listen_list(value: object, keys: dict[str, tuple[str, Parser]] | None = None
                ) -> tuple[Listener, ...]:
    """server.listen; `keys`: what a listener mapping may hold (LISTENER_KEYS)."""
    items = [value] if isinstance(value, str) else value  # one address needs no list
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f'must be a non-empty list of "host:port" addresses, got {got(value)}')
    if len(items) > MAX_LISTENERS:
        raise ValueError(f"must have at most {MAX_LISTENERS} entries, got {len(items)}")
    listeners: list[Listener | None] = []
    problems: list[tuple[str, str]] = []
    for index, item in enumerate(items):
        listener = _listener(item, index, problems, LISTENER_KEYS if keys is None else keys)
        # One address twice is a mistake, whatever server.reuse_port says (an address
        # beside a wildcard of its port is one only without it: wildcard_clashes).
        if listener is not None and listener.port and any(
                other is not None and other.address == listener.address for other in listeners):
            problems.append((f"[{index}]", f"duplicate address, got {got(str(listener))}"))
        listeners.append(listener)
    if problems:
        raise PathProblems(problems, partial=tuple(listeners))
    return tuple(listeners)  # type: ignore[arg-type]  # no None without problems


def wildcard_clashes(listeners: tuple[Listener, ...]) -> list[str]:
    """Without SO_REUSEPORT, an address and a wildcard of its port cannot both be bound
    (with it, the kernel lets them share the port, the more specific one winning for its
    address): the problems, one per listener that could not be bound."""
    problems = []
    for index, listener in enumerate(listeners):
        for before, other in enumerate(listeners[:index]):
            if listener is None or other is None:  # not parsed: reported already
                continue
            if other.address != listener.address and overlaps(other.address, listener.address):
                problems.append(
                    f"server.listen[{index}]: overlaps server.listen[{before}] ({other}): a "
                    "wildcard address takes its port on every address of its family (unless "
                    f"server.reuse_port is on), got {got(str(listener))}")
                break
    return problems


def dump_listeners(listeners: tuple[Listener, ...], default_tls: str,
                   profile: Callable[[Listener], dict[str, object]] | None = None
                   ) -> list[object]:
    """A string for a listener in the default TLS mode with no profile keys, else a
    mapping; `profile` gives a listener's profile keys (profiles.dump_profile)."""
    out: list[object] = []
    for listener in listeners:
        extra = {} if profile is None else profile(listener)
        if listener.tls == default_tls and not listener.require_tls and (
                listener.auth == ListenerAuth()) and listener.proxy_protocol is None \
                and not extra:
            out.append(str(listener))
            continue
        entry: dict[str, object] = {"address": str(listener), "tls": listener.tls}
        if listener.require_tls:
            entry["require_tls"] = True
        if listener.auth != ListenerAuth():
            entry["auth"] = dump_auth(listener.auth)
        if listener.proxy_protocol is not None:
            entry["proxy_protocol"] = dump_proxy(listener.proxy_protocol)
        out.append({**entry, **extra})
    return out


def optional_listen(value: object) -> ListenAddress | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f'must be a "host:port" string or null, got {got(value)}')
    return parse_listen(value)


# Dumpers: typed value -> plain YAML value that parses back to an equal value.


def dump_duration(seconds: float) -> object:
    units = (("h", 3600), ("m", 60), ("s", 1))
    candidates = [f"{seconds // scale:.0f}{unit}" for unit, scale in units
                  if seconds >= scale or unit == "s"]
    for text in [*candidates, f"{seconds * 1000:.0f}ms"]:
        if to_seconds(text) == seconds:  # only if exact: float rounding can break one
            return text
    return seconds


def dump_size(size: int) -> object:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return size
