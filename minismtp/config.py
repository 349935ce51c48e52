"""Configuration: a YAML file plus command-line overrides -> validated, frozen dataclasses.

Untrusted input: the YAML file named on the command line and the override values. Both come
from the operator, so the hazard is mistakes, not malice: every problem is reported at once,
one line each, starting with the dotted key path, and ConfigError is the only exception bad
input can raise (a typo must end neither in a traceback nor in a silently ignored key).

Each setting is declared once in SETTINGS (name, default, parser, doc), in the spirit of
gunicorn's `Setting`; the value parsers live in `values.py`. Loading, the section
dataclasses, `dump_config` and README.md's settings table (`settings_doc.py`) all walk
that one table; a test checks that etc/minismtp.yaml shows every default. Defaults are raw
YAML values that go through the same parsers as user values, so a default can never be
something a user could not write.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from minismtp import profiles
from minismtp import values as parsing
from minismtp.clientlimits import PerClient, dump_per_client, parse_per_client
from minismtp.faultrules import RuleProblems, dump_rules, parse_rules, parse_seed
from minismtp.faults import FaultsConfig
from minismtp.smallfile import NotRegularFile, TooLarge, read_small_file
from minismtp.values import CertificatePair, ListenAddress, Listener, Parser, parse_listen

__all__ = [
    "SETTINGS", "CertificatePair", "Config", "ConfigError", "DeliveryConfig", "LimitsConfig",
    "ListenAddress", "Listener", "LoggingConfig", "ServerConfig", "Setting", "StatsConfig",
    "TlsConfig", "dump_config", "load_config", "load_stats_config", "parse_listen",
]


class ConfigError(Exception):
    """Bad configuration; `problems` holds one "dotted.key: what is wrong" line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True, slots=True)
class ServerConfig:
    hostname: str
    listen: tuple[Listener, ...]
    workers: int
    max_connections: int
    reuse_port: bool
    sched_batch: bool | None  # None: auto
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
    min_data_rate_grace: float
    max_errors: int
    max_junk_commands: int
    bare_lf: str
    tls_handshake_timeout: float = 30.0
    proxy_timeout: float = 10.0
    per_client: PerClient = PerClient()  # frozen: one shared default is safe


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    backend: str
    path: str
    fsync: bool
    layout: str
    line_endings: str = "lf"
    envelope_recipients: str = "one"
    group: str | None = None
    file_mode: int = 0o600
    dir_mode: int = 0o700


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str
    format: str


@dataclass(frozen=True, slots=True)
class StatsConfig:
    listen: ListenAddress | None = None  # None: no statistics endpoint


@dataclass(frozen=True, slots=True)
class TlsConfig:
    certificates: tuple[CertificatePair, ...] = ()  # none: no TLS anywhere
    min_version: str = "TLSv1.2"
    ciphers: str | None = None  # OpenSSL cipher string (TLS 1.2); None: Python's defaults
    session_tickets: int = 2  # TLS 1.3 tickets sent after each full handshake


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    limits: LimitsConfig
    delivery: DeliveryConfig
    logging: LoggingConfig
    faults: FaultsConfig = FaultsConfig()  # frozen values: one shared default is safe
    stats: StatsConfig = StatsConfig()
    tls: TlsConfig = TlsConfig()
    # Where it came from is not what it says: a reload that changes nothing compares equal.
    source: str | None = field(default=None, compare=False)
    # Lines worth a look that do not stop the server (a certificate past its dates).
    warnings: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class Setting:
    name: str  # "section.key"
    default: object  # raw, as written in YAML; a callable is called at load time (its
    # docstring says what it gives, in the README)
    parse: Parser
    doc: str  # its "meaning" cell in README.md's table (Markdown): see settings_doc.py
    dump: Callable[[Any], object] | None = None  # None: the value is plain YAML already


def _host_name() -> str:
    """host name"""
    return socket.gethostname()


_positive = parsing.integer(1)
# A session's timeouts: below a second a client cannot even read the greeting in time
# ("0.0001ms" closed connections before their 220), so nothing shorter is meant.
MIN_TIMEOUT_S = 1.0
_timeout = parsing.duration(allow_zero=False, minimum_s=MIN_TIMEOUT_S)
# Workers stamp their heartbeat once a second (worker.py's tick), later when a turn of
# their loop runs long: a timeout near that would have the master kill healthy workers
# over and over.
MIN_WORKER_TIMEOUT_S = 5.0

SETTINGS: tuple[Setting, ...] = (
    Setting("server.hostname", _host_name,
            parsing.host_name(),
            "name in the greeting, the EHLO reply and `Received:` (printable ASCII, no "
            "spaces, at most 253 characters as a DNS name)"),
    Setting("server.listen", ["127.0.0.1:2525"],
            lambda value: parsing.listen_list(value, _LISTENER_KEYS),
            'addresses, `host:port` or `"[::1]:port"`; port 0 binds any free port. No address '
            "twice, and without `server.reuse_port` no two may overlap (`0.0.0.0:25` takes "
            "port 25 on every IPv4 address, `[::]:25` on every IPv6 one). An entry may be a mapping: `address`, `tls` (`none`, "
            "`starttls`, `implicit`; default `starttls` with `tls.certificates`, else "
            "`none`), `require_tls` (`true`: no mail before STARTTLS), `auth` (SMTP AUTH "
            "PLAIN and LOGIN, RFC 4954: a mapping of `mode`: `off`, `htpasswd` or "
            "`accept_any`, every password right, for load tests; `users_file`: for "
            "`htpasswd`, a file as `htpasswd -B` writes it, checked at load; `require`: "
            "`true`, no mail before AUTH; `allow_plaintext`: `true`, AUTH offered before "
            "TLS is up, needed on a listener with `tls: none`), `proxy_protocol`, and its "
            "profile: `name` (in logs and statistics; default the address), `hostname` "
            "(instead of `server.hostname`), `limits` and `faults` (mappings as the "
            "top-level sections, each overriding the keys it names on this listener: "
            "`faults: {rules: []}` turns the top-level rules off there); see *Listener "
            "profiles*",
            lambda listeners: [str(listener) for listener in listeners]),
    Setting("server.workers", "auto", parsing.worker_count,
            "worker processes (`auto` = CPU count)"),
    Setting("server.max_connections", 4096, _positive,
            "open connections per worker; beyond it `421 4.3.2`"),
    Setting("server.reuse_port", False, parsing.boolean,
            "each worker binds its own `SO_REUSEPORT` socket; off, workers share one socket "
            "and split bursts of new connections between them"),
    Setting("server.sched_batch", "auto", parsing.boolean_or_auto,
            "workers run as `SCHED_BATCH` (Linux): woken, they do not preempt other tasks; "
            "`auto`: unless delivery waits for fsync",
            lambda value: "auto" if value is None else value),
    # listen() takes a C int (and the kernel caps it at net.core.somaxconn anyway).
    Setting("server.backlog", 4096, parsing.integer(1, 2**31 - 1),
            "listen backlog (the kernel caps it)"),
    Setting("server.worker_timeout", "30s",
            parsing.duration(allow_zero=False, minimum_s=MIN_WORKER_TIMEOUT_S),
            "heartbeat age after which the master kills a worker and starts another; at "
            "least `5s`, since a worker stamps its heartbeat only once a second, and later "
            "while a turn of its loop runs long", parsing.dump_duration),
    Setting("server.shutdown_timeout", "30s", parsing.duration(allow_zero=True),
            "time for transactions in flight on stop/reload; `0` = no wait",
            parsing.dump_duration),
    Setting("server.user", None, parsing.printable_name("a user name or null", optional=True),
            "when started as root, workers run as this user, and the Maildir is given to "
            "it; a reload keeps the running user (a change needs a restart). The "
            "Maildir's `tmp/`, `new/` or `cur/` being a symlink (which that user could "
            "plant for root to follow) stops a start and refuses a reload; "
            "`delivery.path` itself may be one"),
    Setting("limits.max_message_size", "32M", parsing.size,
            "EHLO `SIZE`; larger bodies get `552 5.3.4` after their end", parsing.dump_size),
    Setting("limits.max_recipients", 1000, _positive,
            "more get `452 4.5.3` (RFC 5321 4.5.3.1.8: at least 100)"),
    Setting("limits.max_command_length", 512, parsing.integer(512, 65536),
            "octets with CRLF, up to 65536 (RFC 5321 4.5.3.1.4: 512), MAIL 536 more for "
            "its parameters (RFC 1870, 4954, 6531); longer lines get `500 5.5.2` and are "
            "skipped unbuffered"),
    Setting("limits.command_timeout", "300s", _timeout,
            "idle time between commands, then `421 4.4.2` (RFC 5321 4.5.3.2.7: 5 minutes); "
            "at least `1s`, as are the other timeouts of this section",
            parsing.dump_duration),
    Setting("limits.data_timeout", "1h", _timeout,
            "deadline for a whole DATA phase (RFC 5321 sets none; an hour lets the "
            "largest message in at 10 kB/s)", parsing.dump_duration),
    Setting("limits.min_data_rate", 500, parsing.integer(0),
            "bytes/s a DATA phase must keep up: *t* seconds after the `354` the client "
            "must have sent `min_data_rate * (t - limits.min_data_rate_grace)` bytes, "
            "else `421 4.4.2`; every byte counts, those sent during the grace too; "
            "`0` = off"),
    Setting("limits.min_data_rate_grace", "180s", parsing.duration(allow_zero=True),
            "head start of `limits.min_data_rate`: a credit of `min_data_rate * grace` "
            "bytes, used up by a pause before the body or by slow spells later (not a "
            "time after which an average is taken); RFC 5321 4.5.3.2.5 lets a client wait "
            "3 minutes for a block of data to go out, and a sender's filter or a lossy "
            "link may hold the first byte that long. At least `1s` while "
            "`min_data_rate` is on: with none, every DATA got `421` right after its `354`",
            parsing.dump_duration),
    Setting("limits.max_errors", 20, _positive,
            "protocol errors before `421 4.7.0`; a stored message forgives those before "
            "it, except wrong passwords, as Postfix does (an HTTP request line, `GET`, `POST`, "
            "`CONNECT` and the like, is no error: it gets `221 2.7.0` and the connection is "
            "closed at once, so that a browser made to post to the server, even over TLS, "
            "cannot slip commands in its body; Postfix's `smtpd_forbidden_commands`)"),
    Setting("limits.max_junk_commands", 100, parsing.integer(0),
            "HELO, EHLO, NOOP, RSET, VRFY, HELP, MAIL refused for its SIZE, DATA refused for "
            "want of a recipient and AUTH answered `454`, per session (reset by a stored "
            "message) before each further one counts as a protocol error"),
    Setting("limits.bare_lf", "normalize", parsing.choice("normalize", "reject", "accept"),
            "a line ending in LF without CR (a bare LF). `normalize` (Postfix 3.9's "
            "default): a line end, in commands and in the body, stored like any other; a "
            "`.` after it is unstuffed, never the end of DATA; `reject`: `500 5.5.2` for "
            "such a command, `550 5.5.2` after such a body; `accept`: the body is stored "
            "as it came (mixed line endings). Under every policy only "
            "`<CR><LF>.<CR><LF>` ends DATA"),
    Setting("limits.tls_handshake_timeout", "30s", _timeout,
            "time a TLS handshake may take (STARTTLS or implicit). On Linux an implicit-TLS "
            "listener defers accepting until the ClientHello is in (`TCP_DEFER_ACCEPT`): a "
            "client that connects and stays silent reaches minismtp after about a second, "
            "and this time starts then", parsing.dump_duration),
    Setting("limits.proxy_timeout", "10s", _timeout,
            "time a load balancer has to send its whole PROXY header, on a listener with "
            "`proxy_protocol`", parsing.dump_duration),
    Setting("limits.per_client", {"max_sessions": 0, "max_new_sessions_per_minute": 0,
                                  "max_recipients_per_minute": 0, "exempt": [],
                                  "table_size": 16384, "ipv6_prefix_length": 84},
            parse_per_client,
            "per client address, counted across all workers (Postfix's anvil); 0 = no "
            "limit. `max_sessions`: sessions open at once, beyond it `421 4.7.0`; "
            "`max_new_sessions_per_minute`: sessions begun in the last minute, attempts "
            "included, beyond it `421 4.7.0`; `max_recipients_per_minute`: RCPT commands "
            "in the last minute, beyond it `450 4.7.1` (counted as RCPTs past "
            "`limits.max_recipients` are: after 1000 in a session each is an error too); "
            "`exempt`: networks never limited "
            "nor counted (e.g. your own); `table_size`: clients tracked at once, a power "
            "of two from 1024 to 65536, fixed when the master starts; "
            "`ipv6_prefix_length`: IPv6 clients in one network of this many bits count as "
            "one (Postfix's default, 84). The client is the PROXY header's source on a "
            "listener with `proxy_protocol`. On an implicit-TLS listener a session counts "
            "from its handshake, and one refused is closed without a word (no 421)",
            dump_per_client),
    Setting("delivery.backend", "maildir", parsing.choice("maildir", "discard"),
            "`maildir` or `discard`"),
    Setting("delivery.path", "./var/mail", parsing.file_path,
            "Maildir root (`tmp/`, `new/`, `cur/` made with `delivery.dir_mode`), relative "
            "to the working directory; it may be a symlink, but `tmp/`, `new/` and `cur/` "
            "must be directories, never symlinks (refused however the server runs: the "
            "master, often root, does not follow them)"),
    Setting("delivery.fsync", True, parsing.boolean,
            "a `250` means the file and its directory entry are on disk"),
    Setting("delivery.layout", "single", parsing.choice("single", "per_recipient"),
            "`single`, or `per_recipient`: `<path>/<domain>/<local-part>/`, made when a "
            "message for it is stored (at most 100 new mailboxes per message; past that "
            "`451`, and a retry makes the rest)"),
    Setting("delivery.line_endings", "lf", parsing.choice("lf", "crlf"),
            "line endings of stored files, trace headers included: `lf`, the Maildir "
            "convention that mail readers expect; `crlf`, the wire form unchanged"),
    Setting("delivery.envelope_recipients", "one", parsing.choice("all", "one", "none"),
            "how a stored file records its envelope recipients: `one`, a `Delivered-To:` "
            "only for a message to exactly one recipient; `all`, one per recipient, which "
            "shows each recipient, Bcc included, to everyone reading the mailbox (with "
            "`per_recipient` a message to several gets none whatever this says: its one "
            "file is in each mailbox); `none`, none, nor a `for` clause in `Received:`"),
    Setting("delivery.group", None,
            parsing.printable_name("a group name or null", optional=True),
            "group of the Maildir's files and directories, so that a reader running as "
            "another user in it (Dovecot's mail user) can read them; directories get it "
            "with the set-group-ID bit, which passes it on; `null` = the process's"),
    Setting("delivery.file_mode", "0600", parsing.file_mode(0o600),
            'mode of stored files, an octal string such as `"0640"` (group may read; '
            "unquoted only with its leading 0: YAML reads `640` as decimal, refused); not "
            "narrowed by the umask", parsing.dump_mode),
    Setting("delivery.dir_mode", "0700", parsing.file_mode(0o700),
            'mode of directories minismtp makes, an octal string such as `"0750"` (as '
            "`delivery.file_mode`); existing ones are left as they are", parsing.dump_mode),
    Setting("logging.level", "info", parsing.choice("debug", "info", "warning", "error", fold_case=True),
            "`debug`, `info`, `warning`, `error`"),
    Setting("logging.format", "text", parsing.choice("text", "json"),
            "`text`: one line per record; `json`: one JSON object per line (every record, "
            "the per-message and per-session lines included; not the `faulthandler` "
            "traceback of a worker dying of `SIGABRT` or a fatal signal, plain text)"),
    Setting("faults.seed", None, parse_seed,
            "seed for the fault rules' random choices; `null` = different every run"),
    Setting("faults.rules", [], parse_rules,
            "fault rules, at most 64 (see *Load testing* below)", dump_rules),
    Setting("stats.listen", None, parsing.optional_listen,
            "`host:port` serving `/metrics` and `/stats`; `null` = off",
            lambda address: None if address is None else str(address)),
    Setting("tls.certificates", [], parsing.certificate_list,
            "`{cert, key}` PEM file pairs (one per key type, e.g. ECDSA and RSA: each client "
            "gets the first its signature algorithms allow); none: no TLS",
            lambda pairs: [{"cert": pair.cert, "key": pair.key} for pair in pairs]),
    Setting("tls.min_version", "TLSv1.2", parsing.choice("TLSv1.2", "TLSv1.3"),
            "oldest TLS version accepted: `TLSv1.2` or `TLSv1.3`"),
    Setting("tls.ciphers", None, parsing.cipher_string,
            "OpenSSL cipher string for TLS 1.2 (TLS 1.3 suites are OpenSSL's: a TLS 1.3 "
            "name here is refused); `null` = Python's defaults. With `min_version` "
            "`TLSv1.2`, one that leaves TLS 1.2 clients no cipher the certificates can serve "
            "is refused"),
    Setting("tls.session_tickets", 2, parsing.integer(0, 16),
            "TLS 1.3 session tickets sent per full handshake (resumption across workers: "
            "they share the keys); `0` = none, TLS 1.2's included (a TLS 1.2 client may "
            "still resume by session ID with the worker it last had)"),
)

_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "limits": LimitsConfig,
    "delivery": DeliveryConfig,
    "logging": LoggingConfig,
    "faults": FaultsConfig,
    "stats": StatsConfig,
    "tls": TlsConfig,
}
_BY_NAME = {setting.name: setting for setting in SETTINGS}
# A listener's `limits` take the top-level limits' parsers (profiles.py).
_LIMIT_PARSERS = {name.split(".")[1]: setting.parse for name, setting in _BY_NAME.items()
                  if name.startswith("limits.")}
_LIMIT_DUMPERS = {name.split(".")[1]: setting.dump for name, setting in _BY_NAME.items()
                  if name.startswith("limits.")}
_LISTENER_KEYS = {**parsing.LISTENER_KEYS, **profiles.listener_keys(lambda: _LIMIT_PARSERS)}
_KEYS = {section: [name.split(".")[1] for name in _BY_NAME if name.startswith(section + ".")]
         for section in _SECTIONS}


MAX_CONFIG_BYTES = 1 << 20  # far above any real configuration; the master reads it on HUP
# Entries that merge keys (`<<`) may copy, in all, per file: far above any real use, far
# below what a few hundred bytes of merges of merges could otherwise ask for.
MAX_MERGED_ENTRIES = 100_000
_MERGE = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """safe_load's loader, but a key given twice in one mapping is an error, as YAML
    says: PyYAML would keep the last value and drop the first without a word (a second
    `limits:` section, say). Keys merged in with `<<` may still be overridden."""

    def __init__(self, stream: bytes) -> None:
        super().__init__(stream)
        # Mappings checked already: once merged, a mapping holds the keys merged into it
        # beside its own (PyYAML flattens it in place), which a later merge of it, by an
        # alias, must not take for repeats.
        self._checked: set[int] = set()
        self._flattening: set[int] = set()  # mappings whose merges are being resolved
        self._merged_entries = 0  # copied by merge keys so far, for MAX_MERGED_ENTRIES

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # PyYAML's own constructors fail on some explicitly tagged scalars with whatever
        # their code hits first (`!!bool maybe` a KeyError, `!!int ""` an IndexError,
        # `!!timestamp abc` an AttributeError): each becomes an error at the node.
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as exc:
            raise yaml.constructor.ConstructorError(
                None, None, _not_constructed(node, exc), node.start_mark) from exc

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            self._no_repeats(node)
        return super().construct_mapping(node, deep)

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Replace the `<<` entries of `node` by the entries they merge in, one per key.

        PyYAML's own copies every merged entry, repeats included: a mapping merging nine
        copies of one merging nine copies of ... grows ninefold per level, and 500 bytes
        asked for gigabytes. Here a key merged in once is kept once, with the value YAML's
        merge gives it (the mapping's own keys win, then the earlier merge), and the
        entries copied in all are bounded by MAX_MERGED_ENTRIES."""
        if id(node) in self._flattening:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping merges itself (<<)", node.start_mark)
        own, sources = [], []
        merges = 0
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merges += 1
                if merges > 1:  # YAML readers differ on which wins: say it once, in a list
                    raise yaml.constructor.ConstructorError(
                        None, None, "<< given twice in one mapping: merge both in one "
                        "list, <<: [*first, *second] (the first wins)", key_node.start_mark)
                sources.extend(self._merge_sources(value_node))
            else:
                if key_node.tag == "tag:yaml.org,2002:value":  # as PyYAML does
                    key_node.tag = "tag:yaml.org,2002:str"
                own.append((key_node, value_node))
        if not sources:
            node.value = own
            return
        self._flattening.add(id(node))
        try:
            node.value = self._merged(node, own, sources) + own
        finally:
            self._flattening.discard(id(node))

    def _merge_sources(self, value_node: yaml.Node) -> list[yaml.MappingNode]:
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) \
            else [value_node]
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                raise yaml.constructor.ConstructorError(
                    None, None, f"<< takes a mapping or a list of mappings, found a {source.id}",
                    source.start_mark)
        return sources

    def _merged(self, node: yaml.MappingNode, own: list[tuple[yaml.Node, yaml.Node]],
                sources: list[yaml.MappingNode]) -> list[tuple[yaml.Node, yaml.Node]]:
        """The entries of `sources` whose key neither `own` nor an earlier source has."""
        taken = {self._key_of(key_node) for key_node, _ in own}
        merged = []
        for source in sources:
            self.flatten_mapping(source)  # one entry per key from here on
            self._merged_entries += len(source.value)
            if self._merged_entries > MAX_MERGED_ENTRIES:
                raise yaml.constructor.ConstructorError(
                    None, None, f"merge keys (<<) copy more than {MAX_MERGED_ENTRIES} "
                    "entries in all", node.start_mark)
            for key_node, value_node in source.value:
                key = self._key_of(key_node)
                if key not in taken:
                    taken.add(key)
                    merged.append((key_node, value_node))
        return merged

    def _key_of(self, key_node: yaml.Node) -> object:
        """A key as the mapping will hold it; an unhashable one, which construct_mapping
        refuses later, stands for itself."""
        key = self.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            return ("unhashable", id(key_node))
        return key

    def _no_repeats(self, node: yaml.MappingNode) -> None:
        if id(node) in self._checked:
            return
        self._checked.add(id(node))  # no node is made while constructing: ids stay theirs
        first: dict[object, yaml.Mark] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:  # mappings merged in: theirs
                merged = value_node.value if isinstance(value_node, yaml.SequenceNode) \
                    else [value_node]
                for mapping in merged:
                    if isinstance(mapping, yaml.MappingNode):
                        self._no_repeats(mapping)
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first.setdefault(key, key_node.start_mark)
            except TypeError:  # not hashable: the constructor says so
                continue
            if seen is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f'"{key}" given twice in one mapping (first at line '
                    f"{seen.line + 1}): only the last would count", key_node.start_mark)


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    """YAML's int, as an OctalInt when written in octal (0640), which a mode needs to know."""
    number = loader.construct_yaml_int(node)
    digits = node.value.replace("_", "").lstrip("+-")
    if len(digits) > 1 and digits[0] == "0" and digits[1] not in "bx":
        return parsing.OctalInt(number)
    return number


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _not_constructed(node: yaml.Node, exc: Exception) -> str:
    tag = node.tag.replace("tag:yaml.org,2002:", "!!")
    shown = parsing.got(node.value) if isinstance(node, yaml.ScalarNode) else "this node"
    why = f" ({' '.join(str(exc).split())})" if isinstance(exc, ValueError) else ""
    return f"{shown} is not a valid {tag}{why}"


def _read(path: str, problems: list[str]) -> object:
    data = _read_bytes(path, problems)
    if data is None:
        return None
    try:
        return yaml.load(data, Loader=_Loader)  # safe_load, repeated keys refused
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(exc.problem or exc.context).split())
        problems.append(f'config: invalid YAML in "{path}"{where}: {what}')
    except RecursionError:  # the composer recurses once per nesting level
        problems.append(f'config: invalid YAML in "{path}": nested too deeply')
    # ReaderError: bytes that are not UTF-8; anything else PyYAML raises while reading
    # the operator's file is still their file's problem, never a traceback.
    except Exception as exc:
        problems.append(f'config: invalid YAML in "{path}": {" ".join(str(exc).split())}')
    return None


def _read_bytes(path: str, problems: list[str]) -> bytes | None:
    """The file's bytes, or None with a problem. The master runs this on HUP, so nothing
    here may block or grow without bound (smallfile.py)."""
    try:
        return read_small_file(path, MAX_CONFIG_BYTES)
    except (OSError, NotRegularFile) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        problems.append(f'config: cannot read "{path}": {reason}')
    except TooLarge:
        problems.append(f'config: "{path}" is larger than {MAX_CONFIG_BYTES} bytes (1 MiB), '
                        "the most a configuration may be")
    return None


def _collect(document: object, path: str, problems: list[str]) -> dict[str, object]:
    """Flatten {section: {key: value}} into {"section.key": value}, reporting stray keys."""
    if document is None:  # an empty file means all defaults
        return {}
    if not isinstance(document, dict):
        problems.append(f'config: "{path}" must be a mapping of sections, got {parsing.got(document)}')
        return {}
    values: dict[str, object] = {}
    for section, body in document.items():
        section = str(section)
        if section not in _SECTIONS:  # a key put at the top level is a common slip: say where
            homes = [name for name in _BY_NAME if name.endswith("." + section)]
            hint = f' (did you mean "{homes[0]}"?)' if homes else parsing.suggest(section, [*_SECTIONS])
            problems.append(f"{section}: unknown section{hint}")
        elif body is not None and not isinstance(body, dict):  # null: every key commented out
            problems.append(f"{section}: must be a mapping, got {parsing.got(body)}")
        else:
            for key, value in (body or {}).items():
                name = f"{section}.{key}"
                if name in _BY_NAME:
                    values[name] = value
                else:
                    problems.append(f"{name}: unknown key{parsing.suggest(str(key), _KEYS[section])}")
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
            problems.append(f"{name}: unknown key{parsing.suggest(str(name), list(_BY_NAME))}")

    parsed = _parse(SETTINGS, values, problems)
    problems.extend(_clashes(parsed))
    problems.extend(_rate_grace_problems(parsed))
    problems.extend(_resolve_listeners(parsed))
    if problems:
        raise ConfigError(problems)
    sections = {
        section: cls(**{key: parsed[f"{section}.{key}"] for key in _KEYS[section]})
        for section, cls in _SECTIONS.items()
    }
    warnings = [*_check_tls(sections["tls"]), *_auth_warnings(sections["server"].listen),
                *_exempt_warnings(sections["limits"].per_client)]
    return Config(**sections, source=source, warnings=tuple(warnings))


def load_stats_config(path: str | os.PathLike[str] | None = None) -> StatsConfig:
    """The `stats` section of the file at `path` (defaults without one), for `minismtp
    stats`. The whole file must be YAML with known sections and keys, but only `stats` is
    parsed: no TLS key or users file is read, so an operator without the server's
    privileges can use it. Raises ConfigError listing every problem."""
    problems: list[str] = []
    source = None if path is None else os.fspath(path)
    values = {} if source is None else _collect(_read(source, problems), source, problems)
    parsed = _parse([setting for setting in SETTINGS if setting.name.startswith("stats.")],
                    values, problems)
    if problems:
        raise ConfigError(problems)
    return StatsConfig(**{key: parsed[f"stats.{key}"] for key in _KEYS["stats"]})


def _parse(settings: Sequence[Setting], values: Mapping[str, object],
           problems: list[str]) -> dict[str, object]:
    """Each of `settings` parsed from `values` ("section.key" -> raw), or its default;
    what is wrong goes to `problems`, and the setting is left out (server.listen: what
    did parse of it is kept, None for each bad entry, for the checks between values)."""
    parsed: dict[str, object] = {}
    for setting in settings:
        if setting.name in values:  # present, even as null
            raw = values[setting.name]
        else:
            raw = setting.default() if callable(setting.default) else setting.default
        try:
            parsed[setting.name] = setting.parse(raw)
        except parsing.ItemProblems as exc:
            problems.extend(f"{setting.name}[{index}]: {message}" for index, message in exc.items)
        except (RuleProblems, parsing.PathProblems) as exc:
            problems.extend(f"{setting.name}{path}: {message}" for path, message in exc.items)
            if getattr(exc, "partial", None) is not None:  # for the checks between values
                parsed[setting.name] = exc.partial
        except ValueError as exc:
            problems.append(f"{setting.name}: {exc}")
    return parsed


def _auth_warnings(listeners: tuple[Listener, ...]) -> list[str]:
    warnings = []
    for index, listener in enumerate(listeners):
        auth = listener.auth
        if auth.mode == "accept_any":
            warnings.append(f"server.listen[{index}].auth.mode: accept_any takes every "
                            "password (for load tests only)")
        elif auth.users is not None and (costs := auth.users.mixed_costs):
            warnings.append(
                f"server.listen[{index}].auth.users_file: {auth.users_file} mixes bcrypt "
                f"costs {', '.join(map(str, costs))}: a user with a cheaper hash is refused "
                "sooner than one that does not exist, which tells the user exists; "
                "rehash them at one cost (htpasswd -B -C)")
        if auth.users is not None:
            warnings.extend(_slow_hash_warnings(index, auth.users_file, auth.users))
    return warnings


def _slow_hash_warnings(index: int, path: str | None, users: Any) -> list[str]:
    from minismtp import authcheck, htpasswd  # loaded already: the file was parsed

    cost = users.max_cost
    if cost < htpasswd.SLOW_COST:
        return []
    seconds = htpasswd.seconds_per_check(cost)
    return [f"server.listen[{index}].auth.users_file: {path} has bcrypt cost {cost}: one "
            f"password check takes about {seconds:.1f} s here, and a worker runs "
            f"{authcheck.DEFAULT_THREADS} at a time (a stranger's is checked at the "
            "costliest); 10 to 12 is usual (htpasswd -B -C)"]


def _exempt_warnings(per_client: PerClient) -> list[str]:
    """An IPv6 network that holds all of ::ffff:0:0/96 (::/0, say) in `exempt` reads as
    "everybody" but exempts IPv6 clients only (IPv4 ones are matched by IPv4 networks)."""
    return [f"limits.per_client.exempt: {network} exempts IPv6 clients only; IPv4 clients "
            "need an IPv4 network (0.0.0.0/0 for all)"
            for network in per_client.exempt
            if network.version == 6 and parsing.IPV4_MAPPED.subnet_of(network)]


def _check_tls(config: TlsConfig) -> list[str]:
    """Load what TLS needs as a worker would (files, pairs, cipher string): problems
    raise ConfigError; a certificate past its dates, or one key type left without TLS 1.2
    ciphers while another has them, is only a warning."""
    if not config.certificates:
        return []
    from minismtp import tls  # ssl only where TLS is configured

    context = tls.server_context(config)
    return tls.certificate_warnings(config) + tls.tls12_warnings(context, config)


def _default_tls(certificates: object) -> str:
    return "starttls" if certificates else "none"


def _resolve_listeners(parsed: dict[str, object]) -> list[str]:
    """Give each listener its TLS mode; a mode that needs certificates needs them."""
    listeners = parsed.get("server.listen")
    if not isinstance(listeners, tuple):
        return []  # reported already
    certificates = parsed.get("tls.certificates")
    faults = parsed.get("faults.rules")
    listeners, between = profiles.resolve(
        listeners, FaultsConfig(None, faults if isinstance(faults, tuple) else ()))
    default, resolved = _default_tls(certificates), []
    problems = [f"server.listen{path}: {message}" for path, message in between]
    users: dict[str, object] = {}  # each users file loaded once, however many listeners
    for index, listener in enumerate(listeners):
        if listener is None:  # not parsed: its problems are reported
            resolved.append(listener)
            continue
        mode = listener.tls or default
        if "tls.certificates" not in parsed:
            pass  # they are wrong (reported): whether a mode has what it needs is unknown
        elif mode != "none" and not certificates:
            problems.append(f'server.listen[{index}].tls: "{mode}" needs tls.certificates')
        elif listener.require_tls and mode == "none":
            problems.append(f"server.listen[{index}].require_tls: needs tls: starttls")
        auth = listener.auth
        if auth.offered and mode == "none" and not auth.allow_plaintext \
                and "tls.certificates" in parsed:
            problems.append(f"server.listen[{index}].auth: AUTH is offered only under TLS: "
                            "needs tls: starttls or implicit, or allow_plaintext: true")
        if auth.mode == "htpasswd" and auth.users_file is not None:
            loaded = _load_users(auth.users_file, users)
            if isinstance(loaded, list):
                problems.extend(f"server.listen[{index}].auth.users_file: {problem}"
                                for problem in loaded)
            else:
                auth = replace(auth, users=loaded)
        resolved.append(replace(listener, tls=mode, auth=auth))
    parsed["server.listen"] = tuple(resolved)
    return problems


def _load_users(path: str, cache: dict[str, object]) -> object:
    """htpasswd.Users for `path`, or the list of its problems ("path:line: ...")."""
    if path not in cache:
        try:
            from minismtp.htpasswd import Users, UsersFileError  # bcrypt only where used
        except ImportError as exc:  # the auth extra is not installed
            return [f"checking htpasswd passwords needs the bcrypt package ({exc.name} "
                    "is missing): pip install 'minismtp[auth]'"]
        try:
            cache[path] = Users.load(path)
        except UsersFileError as exc:
            cache[path] = exc.problems
    return cache[path]


def _clashes(parsed: dict[str, object]) -> list[str]:
    """Problems between settings: listeners that cannot all be bound without
    server.reuse_port; the stats endpoint sharing a port with SMTP."""
    smtp = parsed.get("server.listen")
    problems = []
    if isinstance(smtp, tuple) and parsed.get("server.reuse_port") is False:
        problems = parsing.wildcard_clashes(smtp)
    return problems + _stats_clash(parsed.get("stats.listen"), smtp)


def _rate_grace_problems(parsed: dict[str, object]) -> list[str]:
    """min_data_rate on with (almost) no grace: the first deadline of every DATA falls
    due with its 354, so every message would get 421. Checked at the top level and for
    each listener whose limits set either key."""
    top = {key: parsed.get(f"limits.{key}") for key in ("min_data_rate", "min_data_rate_grace")}
    problems = []
    if _grace_too_short(top):
        problems.append(_grace_problem("limits", top))
    listeners = parsed.get("server.listen")
    for index, listener in enumerate(listeners if isinstance(listeners, tuple) else ()):
        if listener is None:
            continue
        own = {key: value for key, value in listener.limits if key in top}
        if own and _grace_too_short({**top, **own}):
            at = "min_data_rate_grace" if "min_data_rate_grace" in own else "min_data_rate"
            problems.append(_grace_problem(f"server.listen[{index}].limits", {**top, **own},
                                           at))
    return problems


def _grace_too_short(limits: Mapping[str, object]) -> bool:
    rate, grace = limits["min_data_rate"], limits["min_data_rate_grace"]
    return isinstance(rate, int) and isinstance(grace, float) and rate > 0 \
        and grace < MIN_TIMEOUT_S


def _grace_problem(where: str, limits: Mapping[str, object],
                   key: str = "min_data_rate_grace") -> str:
    rate = limits["min_data_rate"]
    grace = parsing.got(parsing.dump_duration(limits["min_data_rate_grace"]))
    if key == "min_data_rate":  # the listener turned the rate on; the grace is inherited
        what = f"{rate} bytes/s needs limits.min_data_rate_grace of at least 1s, got {grace}"
    else:
        what = f"must be at least 1s while min_data_rate is on ({rate} bytes/s), got {grace}"
    return f"{where}.{key}: {what}: every DATA would get 421 right after its 354"


def _stats_clash(stats: object, smtp: object) -> list[str]:
    if not isinstance(stats, ListenAddress) or not stats.port or not isinstance(smtp, tuple):
        return []  # port 0 never clashes; a bad server.listen is reported already
    for index, listener in enumerate(smtp):
        if listener is not None and parsing.overlaps(listener.address, stats):
            return [f"stats.listen: same port as server.listen[{index}] ({listener}), "
                    f"got {parsing.got(str(stats))}"]
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
    document["server"]["listen"] = parsing.dump_listeners(
        config.server.listen, _default_tls(config.tls.certificates),
        lambda listener: profiles.dump_profile(listener, _LIMIT_DUMPERS))
    header = "# minismtp effective configuration\n"
    if config.source is not None:
        header += f"# file: {json.dumps(config.source)}, plus any overrides\n"
    # ASCII, non-ASCII characters as YAML escapes: any terminal or locale can take it, and
    # it reads back the same.
    return header + yaml.safe_dump(document, sort_keys=False, allow_unicode=False)
