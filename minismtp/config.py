"""Configuration: a YAML file plus command-line overrides -> validated, frozen dataclasses.

Untrusted input: the YAML file named on the command line and the override values. Both come
from the operator, so the hazard is mistakes, not malice: every problem is reported at once,
one line each, starting with the dotted key path, and ConfigError is the only exception bad
input can raise (a typo must end neither in a traceback nor in a silently ignored key).

Each setting is declared once in SETTINGS (name, default, parser, doc), in the spirit of
gunicorn's `Setting`. Loading, the section dataclasses and `dump_config` all walk that one
table. Defaults are raw YAML values that go through the same parsers as user values, so a
default can never be something a user could not write.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import yaml

from minismtp.faults import FaultsConfig, RuleProblems, dump_rules, parse_rules, parse_seed

Parser = Callable[[Any], Any]


class ConfigError(Exception):
    """Bad configuration; `problems` holds one "dotted.key: what is wrong" line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _ItemProblems(ValueError):
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


@dataclass(frozen=True, slots=True)
class ServerConfig:
    hostname: str
    listen: tuple[ListenAddress, ...]
    workers: int
    max_connections: int
    reuse_port: bool
    backlog: int
    worker_timeout: float
    shutdown_timeout: float
    user: str | None


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_message_size: int
    max_recipients: int
    max_command_length: int
    command_timeout: float
    data_timeout: float
    min_data_rate: int
    max_errors: int
    bare_lf: str


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    backend: str
    path: str
    fsync: bool
    layout: str


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str


@dataclass(frozen=True, slots=True)
class StatsConfig:
    listen: ListenAddress | None = None  # None: no statistics endpoint


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    limits: LimitsConfig
    delivery: DeliveryConfig
    logging: LoggingConfig
    faults: FaultsConfig = FaultsConfig()  # frozen values: one shared default is safe
    stats: StatsConfig = StatsConfig()
    # Where it came from is not what it says: a reload that changes nothing compares equal.
    source: str | None = field(default=None, compare=False)


def _got(value: object) -> str:
    """Show a bad value the way the operator wrote it in YAML, briefly."""
    if isinstance(value, str):  # quoted, control characters escaped
        return json.dumps(value if len(value) <= 60 else value[:57] + "...", ensure_ascii=False)
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


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


# Parsers: raw value -> typed value, or ValueError("must be ..., got ...").

_DIGITS = re.compile(r"[0-9]{1,20}", re.ASCII)  # bounded: int() refuses > 4300 digits


def _as_int(value: object) -> int | None:
    """An int from an int, a whole float or a digit string (command-line values are text)."""
    if isinstance(value, bool):  # YAML `true` must not pass as 1
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return int(value) if isinstance(value, str) and _DIGITS.fullmatch(value) else None


def _integer(low: int, high: int | None = None) -> Parser:
    want = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(value: object) -> int:
        number = _as_int(value)
        if number is None or number < low or (high is not None and number > high):
            raise ValueError(f"must be {want}, got {_got(value)}")
        return number

    return parse


def _workers(value: object) -> int:
    if value == "auto":
        return os.cpu_count() or 1  # cpu_count() is None when it cannot tell
    number = _as_int(value)
    if number is None or number < 1:
        raise ValueError(f'must be an integer >= 1 or "auto", got {_got(value)}')
    return number


def _boolean(value: object) -> bool:
    # Real YAML booleans only: the string "false" is truthy, a classic silent misconfiguration.
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_got(value)}")
    return value


def _choice(*options: str, fold_case: bool = False) -> Parser:
    listed = ", ".join(f'"{option}"' for option in options)

    def parse(value: object) -> str:
        text = value.lower() if fold_case and isinstance(value, str) else value
        if text not in options:
            raise ValueError(f"must be one of {listed}, got {_got(value)}")
        return text

    return parse


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {_got(value)}")
    return value


_PRINTABLE = re.compile(r"[\x21-\x7e]+", re.ASCII)


def _name(want: str, *, optional: bool = False) -> Parser:
    # Host names go verbatim into the greeting and Received: headers: printable ASCII only.
    def parse(value: object) -> str | None:
        if optional and value is None:
            return None
        if not isinstance(value, str) or not _PRINTABLE.fullmatch(value):
            raise ValueError(f"must be {want}, got {_got(value)}")
        return value

    return parse


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?", re.ASCII | re.I)
_SECONDS_PER = {"s": 1, "m": 60, "h": 3600}


def _to_seconds(value: object) -> float | None:
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


def _duration(*, allow_zero: bool) -> Parser:
    want = f'a duration {">=" if allow_zero else ">"} 0 such as "30s", "5m" or "500ms"'

    def parse(value: object) -> float:
        seconds = _to_seconds(value)
        if seconds is None or seconds < 0 or (seconds == 0 and not allow_zero):
            raise ValueError(f"must be {want}, got {_got(value)}")
        return seconds

    return parse


_SIZE = re.compile(r"([0-9]{1,20}(?:\.[0-9]{1,20})?)\s*(?:([kmgt])(?:i?b)?|b)?", re.A | re.I)
_SIZE_SHIFT = {None: 0, "k": 10, "m": 20, "g": 30, "t": 40}  # binary multiples, like Postfix


def _size(value: object) -> int:
    size = _as_int(value)
    if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        exact = Fraction(match[1]) * (1 << _SIZE_SHIFT[match[2] and match[2].lower()])
        size = int(exact) if exact.denominator == 1 else None  # "1.5M" yes, half a byte no
    if size is None or size < 1:
        raise ValueError(f'must be a size >= 1 such as 512, "64K" or "10M", got {_got(value)}')
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
        raise ValueError(f'must be a "host:port" string, got {_got(text)}')
    quoted = _got(text)
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError(f'missing "]" after the IPv6 address, got {quoted}')
        try:
            host = str(ipaddress.IPv6Address(host))  # canonical: [0::1] and [::1] are equal
        except ValueError:
            raise ValueError(f"not an IPv6 address in brackets, got {quoted}") from None
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


def _listen(value: object) -> tuple[ListenAddress, ...]:
    items = [value] if isinstance(value, str) else value  # one address needs no list
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f'must be a non-empty list of "host:port" addresses, got {_got(value)}')
    addresses: list[ListenAddress] = []
    problems: list[tuple[int, str]] = []
    for index, item in enumerate(items):
        try:
            address = parse_listen(item)
        except ValueError as exc:
            problems.append((index, str(exc)))
            continue
        # Binding one address twice fails at start-up; port 0 picks a fresh port each time.
        if address.port and address in addresses:
            problems.append((index, f"duplicate address, got {_got(item)}"))
        addresses.append(address)
    if problems:
        raise _ItemProblems(problems)
    return tuple(addresses)


def _stats_listen(value: object) -> ListenAddress | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f'must be a "host:port" string or null, got {_got(value)}')
    return parse_listen(value)


# Dumpers: typed value -> plain YAML value that parses back to an equal value.


def _dump_duration(seconds: float) -> object:
    units = (("h", 3600), ("m", 60), ("s", 1))
    candidates = [f"{seconds // scale:.0f}{unit}" for unit, scale in units
                  if seconds >= scale or unit == "s"]
    for text in [*candidates, f"{seconds * 1000:.0f}ms"]:
        if _to_seconds(text) == seconds:  # only if exact: float rounding can break one
            return text
    return seconds


def _dump_size(size: int) -> object:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return size


@dataclass(frozen=True, slots=True)
class Setting:
    name: str  # "section.key"
    default: object  # raw, as written in YAML; a callable is called at load time
    parse: Parser
    doc: str
    dump: Callable[[Any], object] | None = None  # None: the value is plain YAML already


_positive = _integer(1)
_timeout = _duration(allow_zero=False)

SETTINGS: tuple[Setting, ...] = (
    Setting("server.hostname", socket.gethostname,
            _name("a host name of printable ASCII, no spaces"),
            "name in the greeting and Received: headers"),
    Setting("server.listen", ["127.0.0.1:2525"], _listen,
            '"host:port" or "[v6addr]:port" addresses to bind; port 0 = any',
            lambda addresses: [str(address) for address in addresses]),
    Setting("server.workers", "auto", _workers, 'worker processes; "auto" = one per CPU'),
    Setting("server.max_connections", 4096, _positive, "open client connections per worker"),
    Setting("server.reuse_port", False, _boolean, "SO_REUSEPORT: one socket per worker"),
    Setting("server.backlog", 4096, _positive, "listen() backlog"),
    Setting("server.worker_timeout", "30s", _timeout,
            "heartbeat age after which the master kills a worker", _dump_duration),
    Setting("server.shutdown_timeout", "30s", _duration(allow_zero=True),
            "graceful stop: time for transactions in flight", _dump_duration),
    Setting("server.user", None, _name("a user name or null", optional=True),
            "user the workers switch to when started as root"),
    Setting("limits.max_message_size", "32M", _size,
            "largest message in bytes (EHLO SIZE)", _dump_size),
    Setting("limits.max_recipients", 1000, _positive,
            "RCPT TO per message (RFC 5321 4.5.3.1.8 asks >= 100)"),
    Setting("limits.max_command_length", 512, _integer(512, 65536),
            "command line octets incl. CRLF (RFC 5321 4.5.3.1.4)"),
    Setting("limits.command_timeout", "300s", _timeout,
            "wait for the next command (RFC 5321 4.5.3.2.7)", _dump_duration),
    Setting("limits.data_timeout", "10m", _timeout,
            "deadline for the whole DATA phase", _dump_duration),
    Setting("limits.min_data_rate", 500, _integer(0),
            "bytes/s during DATA below which to disconnect; 0 = off"),
    Setting("limits.max_errors", 20, _positive, "protocol errors before 421 and disconnect"),
    Setting("limits.bare_lf", "reject", _choice("reject", "accept"),
            "bare LF in DATA: reject the message, or accept it"),
    Setting("delivery.backend", "maildir", _choice("maildir", "discard"),
            "where accepted messages go"),
    Setting("delivery.path", "./var/mail", _text, "Maildir root, relative to the working dir"),
    Setting("delivery.fsync", True, _boolean, "fsync file and directory before the 250"),
    Setting("delivery.layout", "single", _choice("single", "per_recipient"),
            "one Maildir for all, or one per recipient"),
    Setting("logging.level", "info", _choice("debug", "info", "warning", "error", fold_case=True),
            "least severe level logged"),
    Setting("faults.seed", None, parse_seed,
            "seed for every random fault decision; null = not reproducible"),
    Setting("faults.rules", [], parse_rules,
            "fault injection rules: stage, optional matches, rate, action", dump_rules),
    Setting("stats.listen", None, _stats_listen,
            '"host:port" serving GET /metrics and /stats; null = off',
            lambda address: None if address is None else str(address)),
)

_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "limits": LimitsConfig,
    "delivery": DeliveryConfig,
    "logging": LoggingConfig,
    "faults": FaultsConfig,
    "stats": StatsConfig,
}
_BY_NAME = {setting.name: setting for setting in SETTINGS}
_KEYS = {section: [name.split(".")[1] for name in _BY_NAME if name.startswith(section + ".")]
         for section in _SECTIONS}


def _read(path: str, problems: list[str]) -> object:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        problems.append(f'config: cannot read "{path}": {exc.strerror or exc}')
        return None
    try:
        return yaml.safe_load(data)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(exc.problem or exc.context).split())
        problems.append(f'config: invalid YAML in "{path}"{where}: {what}')
    # ReaderError: bytes that are not UTF-8; ValueError: a date like 2024-13-45, a huge int.
    except (yaml.YAMLError, ValueError) as exc:
        problems.append(f'config: invalid YAML in "{path}": {" ".join(str(exc).split())}')
    except RecursionError:  # the composer recurses once per nesting level
        problems.append(f'config: invalid YAML in "{path}": nested too deeply')
    return None


def _collect(document: object, path: str, problems: list[str]) -> dict[str, object]:
    """Flatten {section: {key: value}} into {"section.key": value}, reporting stray keys."""
    if document is None:  # an empty file means all defaults
        return {}
    if not isinstance(document, dict):
        problems.append(f'config: "{path}" must be a mapping of sections, got {_got(document)}')
        return {}
    values: dict[str, object] = {}
    for section, body in document.items():
        section = str(section)
        if section not in _SECTIONS:  # a key put at the top level is a common slip: say where
            homes = [name for name in _BY_NAME if name.endswith("." + section)]
            hint = f' (did you mean "{homes[0]}"?)' if homes else _suggest(section, [*_SECTIONS])
            problems.append(f"{section}: unknown section{hint}")
        elif body is not None and not isinstance(body, dict):  # null: every key commented out
            problems.append(f"{section}: must be a mapping, got {_got(body)}")
        else:
            for key, value in (body or {}).items():
                name = f"{section}.{key}"
                if name in _BY_NAME:
                    values[name] = value
                else:
                    problems.append(f"{name}: unknown key{_suggest(str(key), _KEYS[section])}")
    return values


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Defaults, then the file at `path`, then `overrides` ("section.key" -> raw value).

    Raises ConfigError listing every problem; never returns a partly valid Config.
    """
    problems: list[str] = []
    source = None if path is None else os.fspath(path)
    values = {} if source is None else _collect(_read(source, problems), source, problems)
    for name, value in (overrides or {}).items():
        if name in _BY_NAME:
            values[name] = value
        else:
            problems.append(f"{name}: unknown key{_suggest(str(name), list(_BY_NAME))}")

    parsed: dict[str, object] = {}
    for setting in SETTINGS:
        if setting.name in values:  # present, even as null
            raw = values[setting.name]
        else:
            raw = setting.default() if callable(setting.default) else setting.default
        try:
            parsed[setting.name] = setting.parse(raw)
        except _ItemProblems as exc:
            problems.extend(f"{setting.name}[{index}]: {message}" for index, message in exc.items)
        except RuleProblems as exc:
            problems.extend(f"{setting.name}{path}: {message}" for path, message in exc.items)
        except ValueError as exc:
            problems.append(f"{setting.name}: {exc}")
    problems.extend(_clashes(parsed))
    if problems:
        raise ConfigError(problems)
    sections = {
        section: cls(**{key: parsed[f"{section}.{key}"] for key in _KEYS[section]})
        for section, cls in _SECTIONS.items()
    }
    return Config(**sections, source=source)


def _clashes(parsed: dict[str, object]) -> list[str]:
    """Problems between settings: the stats endpoint cannot share a port with SMTP."""
    stats = parsed.get("stats.listen")
    smtp = parsed.get("server.listen")
    if not isinstance(stats, ListenAddress) or not stats.port or not isinstance(smtp, tuple):
        return []  # port 0 never clashes; a bad server.listen is reported already
    for index, address in enumerate(smtp):
        # A wildcard binds every address of its family, so it clashes with each of them.
        hosts = {address.host, stats.host}
        if (address.family, address.port) == (stats.family, stats.port) and (
                len(hosts) == 1 or hosts & {"0.0.0.0", "::"}):
            return [f"stats.listen: same port as server.listen[{index}] ({address}), "
                    f"got {_got(str(stats))}"]
    return []


def _dump(setting: Setting, value: object) -> object:
    return value if setting.dump is None else setting.dump(value)


def dump_config(config: Config) -> str:
    """The effective configuration as YAML that load_config reads back to an equal Config."""
    document = {
        section: {
            key: _dump(_BY_NAME[f"{section}.{key}"], getattr(getattr(config, section), key))
            for key in _KEYS[section]
        }
        for section in _SECTIONS
    }
    header = "# minismtp effective configuration\n"
    if config.source is not None:
        header += f"# file: {json.dumps(config.source, ensure_ascii=False)}, plus any overrides\n"
    return header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
