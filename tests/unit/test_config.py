"""Config loading: defaults, the example file, every kind of bad value, overrides, dumps."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from minismtp.config import (
    SETTINGS,
    Config,
    ConfigError,
    DeliveryConfig,
    LimitsConfig,
    ListenAddress,
    Listener,
    LoggingConfig,
    ServerConfig,
    StatsConfig,
    dump_config,
    load_config,
    load_stats_config,
    parse_listen,
)
from minismtp.cli import main
from minismtp.faults import FaultsConfig
from minismtp.signals import MASTER_SIGNALS
from support.configfiles import problems_of

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "minismtp.yaml"
FS_ENCODING = sys.getfilesystemencoding()
SCHEMA = {
    "server": ["hostname", "listen", "workers", "max_connections", "reuse_port", "sched_batch",
               "backlog",
               "worker_timeout", "shutdown_timeout", "user"],
    "limits": ["max_message_size", "max_recipients", "max_command_length", "command_timeout",
               "data_timeout", "min_data_rate", "min_data_rate_grace", "max_errors",
               "max_junk_commands", "bare_lf", "tls_handshake_timeout", "proxy_timeout",
               "per_client"],
    "delivery": ["backend", "path", "fsync", "layout", "line_endings", "envelope_recipients",
                 "group", "file_mode", "dir_mode"],
    "logging": ["level", "format"],
    "faults": ["seed", "rules"],
    "stats": ["listen"],
    "tls": ["certificates", "min_version", "ciphers", "session_tickets"],
}


def write(tmp_path: Path, text: str | bytes, name: str = "minismtp.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- defaults and the example file ---------------------------------------------------


def test_defaults_without_a_file():
    config = load_config()
    assert config.source is None
    assert config.server == ServerConfig(
        hostname=socket.gethostname(),
        listen=(Listener(ListenAddress("127.0.0.1", 2525, socket.AF_INET), "none"),),
        workers=os.cpu_count() or 1,
        max_connections=4096,
        reuse_port=False,
        sched_batch=None,
        backlog=4096,
        worker_timeout=30.0,
        shutdown_timeout=30.0,
        user=None,
    )
    assert config.limits == LimitsConfig(
        max_message_size=32 * 1024 * 1024,
        max_recipients=1000,
        max_command_length=512,
        command_timeout=300.0,
        data_timeout=3600.0,
        min_data_rate=500,
        min_data_rate_grace=180.0,
        max_errors=20,
        max_junk_commands=100,
        bare_lf="normalize",
        tls_handshake_timeout=30.0,
        proxy_timeout=10.0,
    )
    assert config.delivery == DeliveryConfig("maildir", "./var/mail", True, "single")
    assert config.logging == LoggingConfig("info", "text")


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.limits.max_recipients = 5  # type: ignore[misc]


def test_settings_table_matches_the_schema_and_the_dataclasses():
    assert [setting.name for setting in SETTINGS] == [
        f"{section}.{key}" for section, keys in SCHEMA.items() for key in keys
    ]
    for section, cls in [("server", ServerConfig), ("limits", LimitsConfig),
                         ("delivery", DeliveryConfig), ("logging", LoggingConfig)]:
        assert [f.name for f in dataclasses.fields(cls)] == SCHEMA[section]
    assert all(setting.doc for setting in SETTINGS)


def test_example_file_loads_to_the_defaults():
    config = load_config(EXAMPLE)
    assert config == load_config()
    assert config.source == str(EXAMPLE)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "server:\nlimits:\n"])
def test_empty_file_or_empty_sections_mean_defaults(tmp_path, text):
    assert load_config(write(tmp_path, text)) == load_config()


def test_source_does_not_take_part_in_equality(tmp_path):
    config = load_config(write(tmp_path, "server:\n  workers: 3\n"))
    assert config.source == str(tmp_path / "minismtp.yaml")
    assert config == load_config(overrides={"server.workers": 3})


# --- one bad value, one exact line ---------------------------------------------------

BAD_VALUES = [
    # wrong type, out of range, bool for int, fractional float
    ("limits", "max_recipients: ten",
     'limits.max_recipients: must be an integer >= 1, got "ten"'),
    ("limits", "max_recipients: 0", "limits.max_recipients: must be an integer >= 1, got 0"),
    ("limits", "max_recipients: true",
     "limits.max_recipients: must be an integer >= 1, got true"),
    ("limits", "max_recipients: 2.5", "limits.max_recipients: must be an integer >= 1, got 2.5"),
    ("limits", "max_recipients: [1]",
     "limits.max_recipients: must be an integer >= 1, got a list"),
    ("limits", "max_recipients:", "limits.max_recipients: must be an integer >= 1, got null"),
    ("limits", "max_command_length: 100",
     "limits.max_command_length: must be an integer from 512 to 65536, got 100"),
    ("limits", "max_command_length: 65537",
     "limits.max_command_length: must be an integer from 512 to 65536, got 65537"),
    ("limits", "min_data_rate: -1", "limits.min_data_rate: must be an integer >= 0, got -1"),
    ("limits", "max_errors: false", "limits.max_errors: must be an integer >= 1, got false"),
    ("limits", "max_junk_commands: -1",
     "limits.max_junk_commands: must be an integer >= 0, got -1"),
    ("server", "backlog: 0", "server.backlog: must be an integer from 1 to 2147483647, got 0"),
    ("server", "backlog: 2147483648",  # more than listen()'s C int
     "server.backlog: must be an integer from 1 to 2147483647, got 2147483648"),
    ("server", "workers: 0", 'server.workers: must be an integer >= 1 or "auto", got 0'),
    ("server", "workers: AUTO", 'server.workers: must be an integer >= 1 or "auto", got "AUTO"'),
    ("server", "workers: true", 'server.workers: must be an integer >= 1 or "auto", got true'),
    # a DNS name's most: longer ones went into the 220 and EHLO lines (512 octets at most)
    ("server", "hostname: " + "a" * 254,
     "server.hostname: must be a host name of printable ASCII, no spaces, at most 253 "
     f'characters, got 254: "{"a" * 57}..."'),
    ("server", "listen: [{address: '127.0.0.1:2525', hostname: " + "b." * 127 + "}]",
     "server.listen[0].hostname: must be a host name of printable ASCII, no spaces, at most "
     f'253 characters, got 254: "{"b." * 28}b..."'),
    # booleans must be real YAML booleans
    ("server", 'reuse_port: "yes"', 'server.reuse_port: must be true or false, got "yes"'),
    ("server", "reuse_port: 1", "server.reuse_port: must be true or false, got 1"),
    ("server", "sched_batch: batch",
     'server.sched_batch: must be true, false or "auto", got "batch"'),
    ("delivery", 'fsync: "false"', 'delivery.fsync: must be true or false, got "false"'),
    # durations
    ("limits", "command_timeout: 0",
     'limits.command_timeout: must be a duration of at least 1s such as "30s" or "5m", got 0'),
    ("limits", "command_timeout: 5 minutes",
     'limits.command_timeout: must be a duration of at least 1s such as "30s" or "5m", '
     'got "5 minutes"'),
    ("limits", "data_timeout: -1s",
     'limits.data_timeout: must be a duration of at least 1s such as "30s" or "5m", got "-1s"'),
    ("limits", "data_timeout: 1d",
     'limits.data_timeout: must be a duration of at least 1s such as "30s" or "5m", got "1d"'),
    ("limits", "data_timeout: .inf",
     'limits.data_timeout: must be a duration of at least 1s such as "30s" or "5m", got inf'),
    # below a second a session's timeouts closed connections before their greeting
    ("limits", "command_timeout: 0.0001ms",
     'limits.command_timeout: must be a duration of at least 1s such as "30s" or "5m", '
     'got "0.0001ms"'),
    ("limits", "data_timeout: 999ms",
     'limits.data_timeout: must be a duration of at least 1s such as "30s" or "5m", '
     'got "999ms"'),
    ("limits", "tls_handshake_timeout: 0.5",
     'limits.tls_handshake_timeout: must be a duration of at least 1s such as "30s" or "5m", '
     "got 0.5"),
    ("limits", "proxy_timeout: 1ms",
     'limits.proxy_timeout: must be a duration of at least 1s such as "30s" or "5m", '
     'got "1ms"'),
    # with the rate on, no grace had every DATA get 421 right after its 354
    ("limits", "min_data_rate_grace: 0s",
     'limits.min_data_rate_grace: must be at least 1s while min_data_rate is on (500 '
     'bytes/s), got "0s": every DATA would get 421 right after its 354'),
    ("limits", "min_data_rate: 1\n  min_data_rate_grace: 999ms",
     'limits.min_data_rate_grace: must be at least 1s while min_data_rate is on (1 '
     'bytes/s), got "999ms": every DATA would get 421 right after its 354'),
    ("server", "worker_timeout: true",
     'server.worker_timeout: must be a duration of at least 5s such as "30s" or "5m", '
     "got true"),
    # below it the master would kill workers between two of their heartbeats
    ("server", "worker_timeout: 500ms",
     'server.worker_timeout: must be a duration of at least 5s such as "30s" or "5m", '
     'got "500ms"'),
    ("server", "worker_timeout: 4.9",
     'server.worker_timeout: must be a duration of at least 5s such as "30s" or "5m", '
     "got 4.9"),
    ("server", "shutdown_timeout: -1",
     'server.shutdown_timeout: must be a duration >= 0 such as "30s", "5m" or "500ms", got -1'),
    # sizes
    ("limits", "max_message_size: 10X",
     'limits.max_message_size: must be a size >= 1 such as 512, "64K" or "10M", got "10X"'),
    ("limits", "max_message_size: 0",
     'limits.max_message_size: must be a size >= 1 such as 512, "64K" or "10M", got 0'),
    ("limits", "max_message_size: 0.0001K",
     'limits.max_message_size: must be a size >= 1 such as 512, "64K" or "10M", got "0.0001K"'),
    ("limits", "max_message_size: 1.5",
     'limits.max_message_size: must be a size >= 1 such as 512, "64K" or "10M", got 1.5'),
    ("limits", "max_message_size: 10 MB MB",
     'limits.max_message_size: must be a size >= 1 such as 512, "64K" or "10M", '
     'got "10 MB MB"'),
    # enums
    ("limits", "bare_lf: maybe",
     'limits.bare_lf: must be one of "normalize", "reject", "accept", got "maybe"'),
    ("limits", "bare_lf: no",
     'limits.bare_lf: must be one of "normalize", "reject", "accept", got false'),
    ("delivery", "backend: mbox",
     'delivery.backend: must be one of "maildir", "discard", got "mbox"'),
    ("delivery", "layout: Single",
     'delivery.layout: must be one of "single", "per_recipient", got "Single"'),
    ("logging", "level: loud",
     'logging.level: must be one of "debug", "info", "warning", "error", got "loud"'),
    # strings
    ("delivery", 'path: ""', 'delivery.path: must be a non-empty string, got ""'),
    ("delivery", "path: 5", "delivery.path: must be a non-empty string, got 5"),
    # paths the OS would refuse with a ValueError where they are used
    ("delivery", 'path: "./mail\\0x"',
     'delivery.path: must be a path without NUL characters, got "./mail\\u0000x"'),
    ("delivery", 'path: "/var/\\ud800"',
     f"delivery.path: must be a path the file system's encoding ({FS_ENCODING}) can write, "
     'got "/var/\\ud800"'),
    ("tls", 'certificates: [{cert: "/tmp/c\\0", key: /tmp/k}]',
     'tls.certificates[0].cert: must be a path without NUL characters, got "/tmp/c\\u0000"'),
    ("tls", 'certificates: [{cert: /tmp/c, key: "/tmp/\\ud800"}]',
     f"tls.certificates[0].key: must be a path the file system's encoding ({FS_ENCODING}) can "
     'write, got "/tmp/\\ud800"'),
    ("server", 'listen: [{address: "127.0.0.1:0", tls: none, auth: {mode: htpasswd, '
     'users_file: "/u\\0", allow_plaintext: true}}]',
     'server.listen[0].auth.users_file: must be a path without NUL characters, '
     'got "/u\\u0000"'),
    ("tls", 'ciphers: "ECDHE\\0"',
     "tls.ciphers: must be an OpenSSL cipher string of printable ASCII or null, "
     'got "ECDHE\\u0000"'),
    ("tls", 'ciphers: "\\ud800"',
     "tls.ciphers: must be an OpenSSL cipher string of printable ASCII or null, "
     'got "\\ud800"'),
    ("server", 'hostname: "mx 1"',
     'server.hostname: must be a host name of printable ASCII, no spaces, got "mx 1"'),
    ("server", 'hostname: "mx\\r\\n"',
     'server.hostname: must be a host name of printable ASCII, no spaces, got "mx\\r\\n"'),
    ("server", "hostname: 2525",
     "server.hostname: must be a host name of printable ASCII, no spaces, got 2525"),
    ("server", 'user: ""', 'server.user: must be a user name or null, got ""'),
    ("server", "user: 0", "server.user: must be a user name or null, got 0"),
    # listen, as a whole and per entry
    ("server", "listen: []",
     'server.listen: must be a non-empty list of "host:port" addresses, got an empty list'),
    ("server", "listen: {a: 1}",
     'server.listen: must be a non-empty list of "host:port" addresses, got a mapping'),
    ("server", 'listen: ["[::1]"]',
     'server.listen[0]: missing port (use "host:port" or "[v6addr]:port"), got "[::1]"'),
    ("server", 'listen: ["127.0.0.1:25", "host:99999"]',
     'server.listen[1]: port must be a number from 0 to 65535, got "host:99999"'),
    ("server", 'listen: ["localhost"]',
     'server.listen[0]: missing port (use "host:port" or "[v6addr]:port"), got "localhost"'),
    ("server", 'listen: ["host:"]',
     'server.listen[0]: port must be a number from 0 to 65535, got "host:"'),
    ("server", 'listen: ["host:smtp"]',
     'server.listen[0]: port must be a number from 0 to 65535, got "host:smtp"'),
    ("server", 'listen: ["::1:25"]',
     'server.listen[0]: IPv6 addresses need brackets, as in "[::1]:2525", got "::1:25"'),
    ("server", 'listen: ["[::1:25"]',
     'server.listen[0]: missing "]" after the IPv6 address, got "[::1:25"'),
    ("server", 'listen: ["[1.2.3.4]:25"]',
     'server.listen[0]: not an IPv6 address in brackets, got "[1.2.3.4]:25"'),
    ("server", 'listen: ["[::ffff:127.0.0.1]:25"]',  # an IPv6-only socket cannot bind it
     'server.listen[0]: is IPv4-mapped: write "127.0.0.1:25", got "[::ffff:127.0.0.1]:25"'),
    ("server", 'listen: ["[::1]25"]',
     'server.listen[0]: missing port (use "host:port" or "[v6addr]:port"), got "[::1]25"'),
    ("server", 'listen: [":25"]',
     'server.listen[0]: missing host (use "0.0.0.0" or "[::]" for all), got ":25"'),
    ("server", 'listen: ["300.1.1.1:25"]',
     'server.listen[0]: invalid IPv4 address, got "300.1.1.1:25"'),
    ("server", 'listen: ["bad_host!:25"]',
     'server.listen[0]: invalid host name, got "bad_host!:25"'),
    ("server", "listen: [25]", 'server.listen[0]: must be a "host:port" string, got 25'),
    ("server", 'listen: ["127.0.0.1:25", "127.0.0.1:25"]',
     'server.listen[1]: duplicate address, got "127.0.0.1:25"'),
]


@pytest.mark.parametrize(("section", "line", "expected"), BAD_VALUES)
def test_bad_value_gives_one_exact_line(tmp_path, section, line, expected):
    path = write(tmp_path, f"{section}:\n  {line}\n")
    assert problems_of(path) == [expected]


def test_a_host_name_of_253_characters_is_fine(tmp_path):
    name = ".".join(["a" * 63] * 4)[:253]
    path = write(tmp_path, f"server:\n  hostname: {name}\n  listen: [{{address: "
                           f"'127.0.0.1:2525', hostname: {name}}}]\n")
    config = load_config(path)
    assert config.server.hostname == config.server.listen[0].hostname == name


def test_timeouts_of_a_second_and_no_grace_without_a_rate_are_fine(tmp_path):
    path = write(tmp_path, """\
limits:
  command_timeout: 1s
  data_timeout: 1000ms
  tls_handshake_timeout: 1
  proxy_timeout: 1.0
  min_data_rate: 0
  min_data_rate_grace: 0s
""")
    limits = load_config(path).limits
    assert (limits.command_timeout, limits.data_timeout, limits.tls_handshake_timeout,
            limits.proxy_timeout, limits.min_data_rate_grace) == (1.0, 1.0, 1.0, 1.0, 0.0)
    rate_on = write(tmp_path, "limits:\n  min_data_rate: 500\n  min_data_rate_grace: 1s\n")
    assert load_config(rate_on).limits.min_data_rate_grace == 1.0


def test_no_grace_with_a_rate_is_refused_where_a_listener_sets_either(tmp_path):
    path = write(tmp_path, """\
limits:
  min_data_rate: 0
  min_data_rate_grace: 0s
server:
  listen:
    - {address: "127.0.0.1:2525", limits: {min_data_rate: 100}}
    - {address: "127.0.0.1:2526", limits: {min_data_rate: 100, min_data_rate_grace: 5s}}
    - {address: "127.0.0.1:2527", limits: {min_data_rate_grace: 0s}}
    - {address: "127.0.0.1:2528", limits: {min_data_rate: 9, min_data_rate_grace: 1ms}}
""")
    assert problems_of(path) == [
        'server.listen[0].limits.min_data_rate: 100 bytes/s needs '
        'limits.min_data_rate_grace of at least 1s, got "0s": every DATA would get 421 '
        "right after its 354",
        'server.listen[3].limits.min_data_rate_grace: must be at least 1s while '
        'min_data_rate is on (9 bytes/s), got "1ms": every DATA would get 421 right after '
        "its 354",
    ]


def test_values_that_look_odd_but_are_fine(tmp_path):
    path = write(tmp_path, """\
server:
  workers: 2.0                  # a whole float is an integer
  max_connections: "100"        # so is a digit string (command-line values are text)
  listen: "127.0.0.1:0"         # one address needs no list
  user: mail
limits:
  max_recipients: 1
logging:
  level: WARNING
""")
    config = load_config(path)
    assert config.server.workers == 2 and type(config.server.workers) is int
    assert config.server.max_connections == 100
    assert config.server.listen == (
        Listener(ListenAddress("127.0.0.1", 0, socket.AF_INET), "none"),)
    assert config.server.user == "mail"
    assert config.limits.max_recipients == 1
    assert config.logging.level == "warning"


def test_listen_port_zero_may_repeat():
    config = load_config(overrides={"server.listen": ["127.0.0.1:0", "127.0.0.1:0"]})
    assert len(config.server.listen) == 2


@pytest.mark.parametrize(("listen", "expected"), [
    (["0.0.0.0:2525", "127.0.0.1:2525"],
     'server.listen[1]: overlaps server.listen[0] (0.0.0.0:2525): a wildcard address takes '
     'its port on every address of its family (unless server.reuse_port is on), got "127.0.0.1:2525"'),
    (["127.0.0.1:2525", "0.0.0.0:2525"],
     'server.listen[1]: overlaps server.listen[0] (127.0.0.1:2525): a wildcard address takes '
     'its port on every address of its family (unless server.reuse_port is on), got "0.0.0.0:2525"'),
    (["[::1]:2525", "[::]:2525"],
     'server.listen[1]: overlaps server.listen[0] ([::1]:2525): a wildcard address takes '
     'its port on every address of its family (unless server.reuse_port is on), got "[::]:2525"'),
    (["localhost:2525", "0.0.0.0:2525"],
     'server.listen[1]: overlaps server.listen[0] (localhost:2525): a wildcard address takes '
     'its port on every address of its family (unless server.reuse_port is on), got "0.0.0.0:2525"'),
])
def test_listen_addresses_that_cannot_both_be_bound_are_refused(listen, expected):
    assert problems_of(overrides={"server.listen": listen}) == [expected]


def test_with_reuse_port_a_wildcard_and_an_address_of_its_port_pass():
    # SO_REUSEPORT lets them share the port, the more specific one taking its address;
    # one address twice is still a mistake.
    listen = ["0.0.0.0:2525", "127.0.0.1:2525"]
    config = load_config(overrides={"server.listen": listen, "server.reuse_port": True})
    assert [str(entry) for entry in config.server.listen] == listen
    assert problems_of(overrides={"server.listen": ["127.0.0.1:2525", "127.0.0.1:2525"],
                                  "server.reuse_port": True}) == [
        'server.listen[1]: duplicate address, got "127.0.0.1:2525"']


def test_listen_addresses_that_can_both_be_bound_pass():
    # IPv6 listeners are bound IPV6_V6ONLY: "[::]" takes no IPv4 address.
    for listen in (["0.0.0.0:2525", "[::]:2525"], ["[::]:2525", "127.0.0.1:2525"],
                   ["0.0.0.0:2525", "[::1]:2525"], ["127.0.0.1:2525", "127.0.0.2:2525"],
                   ["0.0.0.0:0", "127.0.0.1:0"], ["0.0.0.0:2525", "127.0.0.1:2526"]):
        config = load_config(overrides={"server.listen": listen})
        assert [str(entry) for entry in config.server.listen] == listen


# --- structure: unknown keys and sections, wrong shapes -------------------------------


def test_unknown_key_suggests_the_near_one(tmp_path):
    path = write(tmp_path, "limits:\n  max_recipent: 5\n")
    assert problems_of(path) == [
        'limits.max_recipent: unknown key (did you mean "max_recipients"?)'
    ]


def test_unknown_key_without_a_near_one(tmp_path):
    assert problems_of(write(tmp_path, "delivery:\n  colour: blue\n")) == [
        "delivery.colour: unknown key"
    ]


def test_unknown_section_suggests_the_near_one(tmp_path):
    assert problems_of(write(tmp_path, "limit:\n  max_errors: 3\n")) == [
        'limit: unknown section (did you mean "limits"?)'
    ]


def test_key_at_top_level_points_to_its_section(tmp_path):
    assert problems_of(write(tmp_path, "workers: 4\n")) == [
        'workers: unknown section (did you mean "server.workers"?)'
    ]


@pytest.mark.parametrize(("text", "expected"), [
    ("server: [1, 2]\n", "server: must be a mapping, got a list"),
    ("limits: 5\n", "limits: must be a mapping, got 5"),
    ("logging: debug\n", 'logging: must be a mapping, got "debug"'),
])
def test_section_that_is_not_a_mapping(tmp_path, text, expected):
    assert problems_of(write(tmp_path, text)) == [expected]


@pytest.mark.parametrize(("text", "got"), [
    ("- server\n- limits\n", "a list"),
    ("just words\n", '"just words"'),
    ("42\n", "42"),
])
def test_top_level_that_is_not_a_mapping(tmp_path, text, got):
    path = write(tmp_path, text)
    assert problems_of(path) == [f'config: "{path}" must be a mapping of sections, got {got}']


def test_all_problems_are_reported_together(tmp_path):
    path = write(tmp_path, """\
server:
  workers: 0
  listen: ["[::1]", "127.0.0.1:2525", "host:99999"]
  reuse_port: "no"
limit:
  max_errors: 3
limits:
  max_recipent: 5
  max_message_size: 10X
delivery:
  backend: mbox
""")
    assert problems_of(path) == [
        'limit: unknown section (did you mean "limits"?)',
        'limits.max_recipent: unknown key (did you mean "max_recipients"?)',
        'server.listen[0]: missing port (use "host:port" or "[v6addr]:port"), got "[::1]"',
        'server.listen[2]: port must be a number from 0 to 65535, got "host:99999"',
        'server.workers: must be an integer >= 1 or "auto", got 0',
        'server.reuse_port: must be true or false, got "no"',
        'limits.max_message_size: must be a size >= 1 such as 512, "64K" or "10M", got "10X"',
        'delivery.backend: must be one of "maildir", "discard", got "mbox"',
    ]


# --- files that cannot be read or parsed ----------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert problems_of(path) == [f'config: cannot read "{path}": No such file or directory']


def test_directory_instead_of_a_file(tmp_path):
    assert problems_of(tmp_path) == [f'config: cannot read "{tmp_path}": Is a directory']


@pytest.mark.parametrize(("text", "line", "column", "problem"), [
    ("server:\n  workers: 2\n   backlog: 5\n", 3, 11, "mapping values are not allowed here"),
    ("server:\n  workers: [1, 2\nlimits: {}\n", 3, 7, "expected ',' or ']', but got ':'"),
    ("server:\n  listen: [::1]:25\n", 2, 12, "expected the node content, but found ':'"),
    ('logging:\n  level: "info\n', 3, 1, "found unexpected end of stream"),
    # a key given twice: PyYAML alone would drop the first value without a word
    ("limits:\n  max_recipients: 5\nlimits:\n  max_errors: 7\n", 3, 1,
     '"limits" given twice in one mapping (first at line 1): only the last would count'),
    ("server:\n  workers: 2\n  workers: 3\n", 3, 3,
     '"workers" given twice in one mapping (first at line 2): only the last would count'),
    ("server:\n  <<: {workers: 2,\n        workers: 3}\n", 3, 9,
     '"workers" given twice in one mapping (first at line 2): only the last would count'),
])
def test_invalid_yaml_names_line_and_column(tmp_path, text, line, column, problem):
    path = write(tmp_path, text)
    assert problems_of(path) == [
        f'config: invalid YAML in "{path}" at line {line}, column {column}: {problem}'
    ]


def test_keys_merged_in_may_be_overridden(tmp_path):
    path = write(tmp_path, "server:\n  <<: {workers: 2, backlog: 64}\n  workers: 3\n")
    server = load_config(path).server
    assert (server.workers, server.backlog) == (3, 64)
    # a mapping that overrides what it merged, merged again: its keys are its own once
    chained = write(tmp_path, """\
server:
  listen:
    - &a {address: "127.0.0.1:2525", name: a, hostname: h.example}
    - &b {<<: *a, address: "127.0.0.1:2526", name: b}
    - {<<: *b, address: "127.0.0.1:2527", name: c}
""")
    listen = load_config(chained).server.listen
    assert [(entry.name, entry.hostname) for entry in listen] == [
        ("a", "h.example"), ("b", "h.example"), ("c", "h.example")]


@pytest.mark.parametrize("data", [
    pytest.param(b"server:\n  hostname: \xff\xfe\xfd\n", id="not-utf-8"),
    pytest.param(b"logging:\n  level: 2024-13-45\n", id="impossible-date"),
    pytest.param(b"[" * 5000, id="nested-past-the-recursion-limit"),
])
def test_unparsable_yaml_is_one_line_not_a_traceback(tmp_path, data):
    path = write(tmp_path, data)
    [problem] = problems_of(path)
    assert problem.startswith(f'config: invalid YAML in "{path}"')
    assert "\n" not in problem


@pytest.mark.parametrize(("value", "problem"), [
    # PyYAML's constructors raise KeyError, IndexError or AttributeError for these
    ("!!bool maybe", '"maybe" is not a valid !!bool'),
    ('!!bool ""', '"" is not a valid !!bool'),
    ('!!int ""', '"" is not a valid !!int'),
    ('!!float ""', '"" is not a valid !!float'),
    ("!!timestamp abc", '"abc" is not a valid !!timestamp'),
    ("!!timestamp 2024-13-01",
     '"2024-13-01" is not a valid !!timestamp (month must be in 1..12)'),
    ("!!int 0xZZ",
     '"0xZZ" is not a valid !!int (invalid literal for int() with base 16: \'ZZ\')'),
])
def test_a_tagged_value_yaml_cannot_construct_is_one_line_at_its_place(tmp_path, value,
                                                                        problem):
    path = write(tmp_path, f"server:\n  reuse_port: {value}\n")
    assert problems_of(path) == [
        f'config: invalid YAML in "{path}" at line 2, column 15: {problem}']


@pytest.mark.parametrize("text", [
    "server:\n  listen: {a: 1}\n",
    "server:\n  hostname: 2024-01-01\n",
    pytest.param("limits:\n  data_timeout: " + "9" * 400 + "\n", id="400-digit-duration"),
    pytest.param("limits:\n  max_message_size: " + "9" * 400 + "M\n", id="400-digit-size"),
    "? [a, b]\n: c\n",
    "server:\n  ? [a]\n  : 1\n",
    "server: !!binary aGVsbG8=\n",
    "1: 2\nnull: 3\n",
    "server:\n  1: 2\n",
])
def test_strange_documents_give_config_error_only(tmp_path, text):
    problems = problems_of(write(tmp_path, text))
    assert problems and all("\n" not in problem for problem in problems)


# --- overrides --------------------------------------------------------------------------


def test_overrides_apply_over_the_file(tmp_path):
    path = write(tmp_path, "server:\n  workers: 3\n  backlog: 10\n")
    config = load_config(path, {"server.workers": 2, "server.listen": ["127.0.0.1:0"]})
    assert config.server.workers == 2
    assert config.server.backlog == 10
    assert config.server.listen == (
        Listener(ListenAddress("127.0.0.1", 0, socket.AF_INET), "none"),)


def test_overrides_are_validated_like_file_values(tmp_path):
    path = write(tmp_path, "server:\n  workers: 0\n")
    assert problems_of(path, {
        "server.workers": 2,  # fixes the file's mistake
        "limits.max_recipients": True,
        "server.listen": ["[::1]"],
        "server.worker": 3,
        "bogus": 1,
    }) == [
        'server.worker: unknown key (did you mean "server.workers"?)',
        "bogus: unknown key",
        'server.listen[0]: missing port (use "host:port" or "[v6addr]:port"), got "[::1]"',
        "limits.max_recipients: must be an integer >= 1, got true",
    ]


def test_override_can_set_null():
    assert load_config(overrides={"server.user": "nobody"}).server.user == "nobody"
    assert problems_of(overrides={"delivery.path": None}) == [
        "delivery.path: must be a non-empty string, got null"
    ]


# --- durations and sizes --------------------------------------------------------------


@pytest.mark.parametrize(("raw", "seconds"), [
    (30, 30.0),
    (1.5, 1.5),
    ("30", 30.0),
    ("30s", 30.0),
    ("30S", 30.0),
    ("1.5s", 1.5),
    (".5s", 0.5),
    ("500ms", 0.5),
    ("100ms", 0.1),
    ("1ms", 0.001),
    ("9ms", 0.009),
    ("5m", 300.0),
    ("1h", 3600.0),
    ("1.5h", 5400.0),
    (" 10 s ", 10.0),
])
def test_durations(raw, seconds):
    # shutdown_timeout: a duration with no floor but 0 (a session's timeouts take 1s on)
    config = load_config(overrides={"server.shutdown_timeout": raw})
    assert config.server.shutdown_timeout == seconds


@pytest.mark.parametrize("raw", ["", "s", "ms", "1x", "1.2.3s", "-5s", "5 min", "1e3", "nan"])
def test_bad_durations(raw):
    [problem] = problems_of(overrides={"limits.data_timeout": raw})
    assert problem.startswith("limits.data_timeout: must be a duration of at least 1s")


def test_huge_integer_is_described_not_printed():
    assert problems_of(overrides={"limits.max_recipients": -(10**5000)}) == [
        "limits.max_recipients: must be an integer >= 1, got a very large integer"
    ]


def test_worker_timeout_floor_leaves_room_for_several_heartbeats():
    from minismtp import worker
    from minismtp.config import MIN_WORKER_TIMEOUT_S

    assert MIN_WORKER_TIMEOUT_S >= 5 * worker._TICK_S
    config = load_config(overrides={"server.worker_timeout": "5s"})
    assert config.server.worker_timeout == MIN_WORKER_TIMEOUT_S


def test_zero_shutdown_timeout_is_allowed():
    config = load_config(overrides={"server.shutdown_timeout": "0s"})
    assert config.server.shutdown_timeout == 0.0


@pytest.mark.parametrize(("raw", "size"), [
    (1, 1),
    (1024.0, 1024),
    ("512", 512),
    ("512b", 512),
    ("512K", 512 * 1024),
    ("512k", 512 * 1024),
    ("10M", 10 * 1024**2),
    ("10MB", 10 * 1024**2),
    ("10MiB", 10 * 1024**2),
    ("10 mib", 10 * 1024**2),
    ("1G", 1024**3),
    ("1.5M", 3 * 512 * 1024),
    ("0.5K", 512),
    ("2T", 2 * 1024**4),
])
def test_sizes(raw, size):
    config = load_config(overrides={"limits.max_message_size": raw})
    assert config.limits.max_message_size == size


@pytest.mark.parametrize(
    "raw", ["", "K", "-1K", "10X", "10KK", "1iB", "1e6", "0.1", "1.5", "1.0001K", True])
def test_bad_sizes(raw):
    [problem] = problems_of(overrides={"limits.max_message_size": raw})
    assert problem.startswith("limits.max_message_size: must be a size >= 1")


# --- dump_config ------------------------------------------------------------------------


def _round_trip(tmp_path: Path, config: Config) -> Config:
    return load_config(write(tmp_path, dump_config(config), "dumped.yaml"))


def test_dump_of_defaults_round_trips_with_the_schema_order(tmp_path):
    config = load_config()
    text = dump_config(config)
    document = yaml.safe_load(text)
    assert list(document) == list(SCHEMA)
    assert {section: list(keys) for section, keys in document.items()} == SCHEMA
    assert document["limits"]["max_message_size"] == "32M"
    assert document["limits"]["data_timeout"] == "1h"
    assert document["server"]["listen"] == ["127.0.0.1:2525"]
    assert _round_trip(tmp_path, config) == config


def test_dump_of_unusual_values_round_trips(tmp_path):
    config = load_config(overrides={
        "server.hostname": "true",  # must come back as a string, not a bool
        "server.listen": ["[::1]:25", "0.0.0.0:0", "localhost:2525", "[fe80::1%eth0]:26"],
        "server.workers": 3,
        "server.reuse_port": True,
        "server.worker_timeout": 5.5,
        "server.shutdown_timeout": 0,
        "server.user": "null",
        "limits.max_message_size": 1_000_001,
        "limits.command_timeout": "90s",
        "limits.data_timeout": 1.00001,
        "limits.min_data_rate": 0,
        "limits.min_data_rate_grace": 1e-5,
        "limits.bare_lf": "accept",
        "delivery.backend": "discard",
        "delivery.path": "/var/mail with space: and #hash",
        "delivery.fsync": False,
        "delivery.layout": "per_recipient",
        "logging.level": "DEBUG",
    })
    assert _round_trip(tmp_path, config) == config


def test_dump_of_a_loaded_file_round_trips(tmp_path):
    config = load_config(EXAMPLE, {"limits.command_timeout": "1.25s", "server.backlog": 7})
    assert _round_trip(tmp_path, config) == config


# --- listen addresses -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "host", "port", "family", "shown"), [
    ("127.0.0.1:2525", "127.0.0.1", 2525, socket.AF_INET, "127.0.0.1:2525"),
    ("0.0.0.0:0", "0.0.0.0", 0, socket.AF_INET, "0.0.0.0:0"),
    ("[::1]:2525", "::1", 2525, socket.AF_INET6, "[::1]:2525"),
    ("[::]:25", "::", 25, socket.AF_INET6, "[::]:25"),
    ("[0:0:0::1]:65535", "::1", 65535, socket.AF_INET6, "[::1]:65535"),
    ("[2001:DB8::1]:25", "2001:db8::1", 25, socket.AF_INET6, "[2001:db8::1]:25"),
    ("localhost:2525", "localhost", 2525, socket.AF_INET, "localhost:2525"),
    ("mx-1.example.org:25", "mx-1.example.org", 25, socket.AF_INET, "mx-1.example.org:25"),
])
def test_parse_listen(text, host, port, family, shown):
    address = parse_listen(text)
    assert (address.host, address.port, address.family) == (host, port, family)
    assert str(address) == shown
    assert parse_listen(str(address)) == address


@pytest.mark.parametrize("text", ["[::1]", "host:99999", "::1", "", ":", "-bad-:25", "a..b:1"])
def test_parse_listen_raises_value_error_with_one_line(text):
    with pytest.raises(ValueError) as info:
        parse_listen(text)
    assert "\n" not in str(info.value) and str(info.value)


# --- faults and stats sections ----------------------------------------------------------

LOADTEST = EXAMPLE.with_name("loadtest.yaml")


def test_faults_and_stats_default_to_off():
    config = load_config()
    assert config.faults == FaultsConfig(seed=None, rules=())
    assert config.stats == StatsConfig(listen=None)
    assert [f.name for f in dataclasses.fields(FaultsConfig)] == SCHEMA["faults"]
    assert [f.name for f in dataclasses.fields(StatsConfig)] == SCHEMA["stats"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.stats.listen = None  # type: ignore[misc]


def test_config_can_still_be_built_from_the_four_original_sections():
    config = load_config()
    built = Config(config.server, config.limits, config.delivery, config.logging)
    assert built == config


def _commented_rules(text: str, start: str, end: str | None = None) -> list[dict]:
    """The example rules commented out between two marker lines, as YAML would read them."""
    lines = text.split("\n")
    first = next(i for i, line in enumerate(lines) if line.strip() == start) + 1
    last = len(lines) if end is None else next(
        i for i, line in enumerate(lines) if i >= first and line.strip() == end)
    wanted = [line.split("#", 1)[1] for line in lines[first:last]
              if re.match(r"\s*#\s+(- )?\w+: ", line)]
    return yaml.safe_load(textwrap.dedent("\n".join(wanted)))


def test_loadtest_file_is_a_load_test_config(tmp_path, capsys):
    config = load_config(LOADTEST)
    assert config.delivery.backend == "discard" and config.delivery.fsync is False
    assert config.server.workers == (os.cpu_count() or 1)
    assert config.logging.level == "warning"
    assert str(config.stats.listen) == "127.0.0.1:9025"
    assert config.faults.seed is not None and config.faults.rules == ()
    assert main(["check-config", "--config", str(LOADTEST)]) == 0
    assert load_config(write(tmp_path, capsys.readouterr().out)) == config


@pytest.mark.parametrize(("path", "start", "end"), [
    (LOADTEST, "rules:", None),
    (EXAMPLE, "# At most 64 rules. Examples:", "rules: []"),
])
def test_commented_example_rules_are_valid(path, start, end):
    rules = _commented_rules(path.read_text(encoding="utf-8"), start, end)
    assert len(rules) >= 4
    config = load_config(path, {"faults.rules": rules})
    assert len(config.faults.rules) == len(rules)
    actions = {key for rule in rules for key in ("reply", "delay", "disconnect", "tarpit")
               if key in rule}
    assert actions == {"reply", "delay", "disconnect", "tarpit"}


def test_dump_with_faults_and_stats_round_trips(tmp_path):
    config = load_config(overrides={
        "faults.seed": 12345,
        "faults.rules": [
            {"name": "busy-rcpt", "stage": "rcpt", "recipient": "*@busy.test", "rate": 0.3,
             "reply": "450 4.2.0 Mailbox busy"},
            {"stage": "end_of_data", "delay": {"min": "50ms", "max": 0.5}, "tarpit": 7.5,
             "reply": "451"},
            {"stage": "mail", "sender": "", "client": "2001:db8::/32", "delay": 0.2,
             "disconnect": True},
            {"stage": "quit", "reply": "221 2.0.0 Bye", "rate": 0},
            {"stage": "connect", "client": "10.0.0.0/8", "sender": None, "tarpit": 1},
        ],
        "stats.listen": "[::1]:9025",
    })
    dumped = yaml.safe_load(dump_config(config))
    assert dumped["stats"] == {"listen": "[::1]:9025"}
    assert dumped["faults"]["rules"][0] == {
        "name": "busy-rcpt", "stage": "rcpt", "recipient": "*@busy.test", "rate": 0.3,
        "reply": "450 4.2.0 Mailbox busy"}
    assert dumped["faults"]["rules"][1]["delay"] == {"min": 0.05, "max": 0.5}
    assert _round_trip(tmp_path, config) == config


@pytest.mark.parametrize(("value", "expected"), [
    ("9025", 'stats.listen: missing port (use "host:port" or "[v6addr]:port"), got "9025"'),
    (9025, 'stats.listen: must be a "host:port" string or null, got 9025'),
    (["127.0.0.1:9025"], 'stats.listen: must be a "host:port" string or null, got a list'),
    ("127.0.0.1:2525",
     'stats.listen: same port as server.listen[0] (127.0.0.1:2525), got "127.0.0.1:2525"'),
    ("0.0.0.0:2525",
     'stats.listen: same port as server.listen[0] (127.0.0.1:2525), got "0.0.0.0:2525"'),
])
def test_bad_stats_listen(value, expected):
    assert problems_of(overrides={"stats.listen": value}) == [expected]


def test_stats_listen_may_share_only_what_does_not_clash():
    for smtp, stats in [("127.0.0.1:2525", "127.0.0.2:2525"), ("127.0.0.1:0", "127.0.0.1:0"),
                        ("[::1]:2525", "0.0.0.0:2525"), ("127.0.0.1:2525", "127.0.0.1:9025")]:
        config = load_config(overrides={"server.listen": [smtp], "stats.listen": stats})
        assert str(config.stats.listen) == stats


_SERVER_S_OWN_FILES = """\
server:
  listen:
    - {address: "127.0.0.1:2525", auth: {mode: htpasswd, users_file: /nonexistent/users}}
tls:
  certificates: [{cert: /nonexistent/cert.pem, key: /nonexistent/key.pem}]
stats:
  listen: "127.0.0.1:9025"
"""


def test_the_stats_section_loads_without_reading_the_server_s_files(tmp_path):
    # Keys and users files readable by the server alone: here, files that are not there.
    path = write(tmp_path, _SERVER_S_OWN_FILES)
    assert load_stats_config(path) == StatsConfig(parse_listen("127.0.0.1:9025"))
    assert load_stats_config() == StatsConfig(listen=None)
    with pytest.raises(ConfigError):
        load_config(path)  # serving needs them


@pytest.mark.parametrize(("text", "problem"), [
    ("stats:\n  listen: 9025\n", 'stats.listen: must be a "host:port" string or null, got 9025'),
    ("stats:\n  listne: x\n", 'stats.listne: unknown key (did you mean "listen"?)'),
    ("stat:\n  listen: x\n", 'stat: unknown section (did you mean "stats"?)'),
    ("server:\n  hostnme: x\n", 'server.hostnme: unknown key (did you mean "hostname"?)'),
    ("stats: [\n", "config: invalid YAML in "),
])
def test_the_stats_section_alone_still_reports_a_bad_file(tmp_path, text, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_stats_config(path)
    [reported] = info.value.problems
    assert reported.startswith(problem), reported


def test_the_stats_command_reads_only_the_stats_section(tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = sock.getsockname()[1]
        path = write(tmp_path, _SERVER_S_OWN_FILES.replace("9025", str(port)))
        assert main(["stats", "--config", str(path), "--once"]) == 1
    assert capsys.readouterr().err == (
        f"minismtp: cannot reach http://127.0.0.1:{port}/stats: Connection refused "
        "(is minismtp running with this configuration?)\n")


def test_fault_problems_come_with_the_others(tmp_path):
    path = write(tmp_path, """\
server:
  workers: 0
faults:
  seed: -3
  rules:
    - stage: rcpt
      rate: 1.5
      reply: "450 4.2.0 Mailbox busy"
    - name: slow
      stage: helo
      recipient: "*@x.test"
      delay: 1
    - {stage: rcpt, disconnect: true, reply: "550 5.0.0 No"}
  rule: []
stats:
  listen: "localhost"
""")
    assert problems_of(path) == [
        'faults.rule: unknown key (did you mean "rules"?)',
        'server.workers: must be an integer >= 1 or "auto", got 0',
        "faults.seed: must be an integer >= 0 or null, got -3",
        "faults.rules[0].rate: must be a number from 0 to 1, got 1.5",
        'faults.rules[1].recipient: cannot match at stage "helo": only at rcpt, data, end_of_data',
        "faults.rules[2].disconnect: cannot be combined with reply: a disconnect sends no reply",
        'stats.listen: missing port (use "host:port" or "[v6addr]:port"), got "localhost"',
    ]


@pytest.mark.parametrize("workers", ["\u00b2", "\u0663", "1\u00b2"])
def test_workers_override_takes_ascii_digits_only(tmp_path, workers, capsys, monkeypatch):
    # "²" and "٣" pass str.isdigit() but int() refuses "²": a ConfigError, never a ValueError.
    with pytest.raises(ConfigError) as caught:
        load_config(overrides={"server.workers": workers})
    expected = f'server.workers: must be an integer >= 1 or "auto", got "{workers}"'
    assert caught.value.problems == [expected]
    monkeypatch.chdir(tmp_path)  # serve must stop before creating anything
    assert main(["serve", "--listen", "127.0.0.1:0", "--workers", workers]) == 2
    assert capsys.readouterr().err == f"minismtp: {expected}\n"
    assert not (tmp_path / "var").exists()
    # serve blocks the master's signals until its handlers are in place: with no
    # master to come, the mask is put back as it was
    assert not set(signal.pthread_sigmask(signal.SIG_BLOCK, [])) & set(MASTER_SIGNALS)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # and Ctrl-C's


def test_workers_override_as_text_is_an_integer():
    assert load_config(overrides={"server.workers": "3"}).server.workers == 3


def test_max_junk_commands_reaches_the_core():
    from minismtp.session import protocol_settings

    config = load_config(overrides={"limits.max_junk_commands": 7})
    assert protocol_settings(config).max_junk_commands == 7


def merge_bomb(depth: int) -> str:
    """Each level merges nine copies of the one before: PyYAML alone copies 9**depth
    entries (depth 8 took a minute and most of a gigabyte)."""
    lines = ['limits: &a0 {max_errors: 7}']
    lines += [f"x{level}: &a{level} {{<<: [{', '.join([f'*a{level - 1}'] * 9)}]}}"
              for level in range(1, depth + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("depth", [8, 12])
def test_a_merge_key_bomb_is_parsed_at_once(tmp_path, depth):
    path = write(tmp_path, merge_bomb(depth))
    # In a child, so that a regression fails in seconds instead of filling the memory.
    run = subprocess.run([sys.executable, "-m", "minismtp", "check-config", "--config", path],
                         capture_output=True, text=True, timeout=10, check=False,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    # the keys merged in are one each; the stray top-level keys are what is wrong
    assert (run.returncode, run.stderr.splitlines()) == (
        2, [f"minismtp: x{level}: unknown section" for level in range(1, depth + 1)])


def test_merge_precedence_own_keys_then_earlier_merges(tmp_path):
    path = write(tmp_path, """\
server:
  <<: [{workers: 2, backlog: 64, max_connections: 10}, {workers: 5, backlog: 65, hostname: m}]
  backlog: 128
""")
    server = load_config(path).server
    assert (server.workers, server.backlog, server.max_connections, server.hostname) == (
        2, 128, 10, "m")
    # a mapping merged many times over counts once
    repeated = write(tmp_path, "limits:\n  <<: [&a {max_errors: 7}, *a, *a, {max_errors: 9}]\n")
    assert load_config(repeated).limits.max_errors == 7


def test_merges_copying_too_many_entries_in_all_are_refused(tmp_path):
    # not exponential but quadratic: many mappings each merging one large mapping
    keys = ", ".join(f"k{index}: 1" for index in range(20_000))
    mappings = "\n".join(f"m{index}: {{<<: *big}}" for index in range(20))
    path = write(tmp_path, f"big: &big {{{keys}}}\n{mappings}\n")
    [problem] = problems_of(path)
    assert problem.startswith(f'config: invalid YAML in "{path}" at line 7, column 5: ')
    assert problem.endswith("merge keys (<<) copy more than 100000 entries in all")


def test_two_merge_keys_in_one_mapping_are_refused(tmp_path):
    """YAML readers differ on which of two << keys wins (PyYAML's own: the later): one
    list says it plainly, the first winning."""
    path = write(tmp_path, """\
mx: &mx {max_message_size: 50M}
bulk: &bulk {max_message_size: 10M}
limits: {<<: *mx, <<: *bulk}
""")
    [problem] = problems_of(path)
    assert problem.startswith(f'config: invalid YAML in "{path}" at line 3, column 19: ')
    assert problem.endswith("<< given twice in one mapping: merge both in one list, "
                            "<<: [*first, *second] (the first wins)")


def test_a_mapping_merging_itself_is_refused(tmp_path):
    path = write(tmp_path, "server: &s {<<: *s, workers: 2}\n")
    [problem] = problems_of(path)
    assert problem.startswith(f'config: invalid YAML in "{path}"')


@pytest.mark.parametrize("env", [{"PYTHONUTF8": "0", "LC_ALL": "C"},
                                 {"PYTHONIOENCODING": "ascii"}], ids=["c-locale", "ascii"])
def test_check_config_writes_non_ascii_values_to_an_ascii_stdout(tmp_path, env):
    """It ended in a UnicodeEncodeError; the dump now escapes in YAML's way and reads
    back the same, and what goes to stderr is escaped too."""
    ascii_names = "LC_ALL" in env  # the file system's encoding is ASCII there too
    mail = tmp_path / ("mail" if ascii_names else "\u65e5\u672c")
    path = write(tmp_path, f"""\
delivery:
  path: "{mail}"
faults:
  rules:
    - {{stage: rcpt, recipient: "*@ex\u00e4mple.test", reply: "450 4.2.0 x"}}
limits:
  per_client: {{exempt: ["::/0"]}}
""")
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("LANG", "LC_ALL", "LC_CTYPE", "PYTHONIOENCODING", "PYTHONUTF8")}
    run = subprocess.run([sys.executable, "-m", "minismtp", "check-config", "--config", path],
                         capture_output=True, timeout=60, check=False,
                         env={**environment, **env, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert (run.returncode, run.stderr.decode("ascii").startswith("minismtp: warning:")) \
        == (0, True), run.stderr
    dump = run.stdout.decode("ascii")
    assert '"*@ex\\xE4mple.test"' in dump
    assert ascii_names or '\\u65E5\\u672C"' in dump
    assert load_config(write(tmp_path, dump, name="dump.yaml")) == load_config(path)


def test_check_config_escapes_a_non_ascii_path_in_an_error_on_an_ascii_stderr(tmp_path):
    missing = tmp_path / "\u00e9t\u00e9.yaml"
    run = subprocess.run([sys.executable, "-m", "minismtp", "check-config", "--config", missing],
                         capture_output=True, timeout=60, check=False,
                         env={**os.environ, "PYTHONIOENCODING": "ascii:strict",
                              "PYTHONPATH": os.pathsep.join(sys.path)})
    assert (run.returncode, run.stderr.decode("ascii")) == (
        2, f'minismtp: config: cannot read "{tmp_path}/\\xe9t\\xe9.yaml": No such file or '
        "directory\n")


def test_checks_between_listeners_run_beside_a_bad_entry(tmp_path):
    """Every problem at once: a bad listener, or a bad key elsewhere, no longer hides
    those between the listeners that did parse (a second round of check-config)."""
    path = write(tmp_path, """\
server:
  listen:
    - {address: "127.0.0.1:2525", name: a}
    - {address: "127.0.0.1:2526", name: a}
    - {address: "127.0.0.1:2527", tls: starttls}
    - {address: "127.0.0.1:2528", bogus: 1}
    - {address: "0.0.0.0:2529"}
    - {address: "127.0.0.1:2529"}
limits:
  max_errors: 0
""")
    assert problems_of(path) == [
        "server.listen[3].bogus: unknown key",
        "limits.max_errors: must be an integer >= 1, got 0",
        "server.listen[5]: overlaps server.listen[4] (0.0.0.0:2529): a wildcard address takes "
        "its port on every address of its family (unless server.reuse_port is on), got "
        '"127.0.0.1:2529"',
        'server.listen[1].name: duplicate name "a" (also server.listen[0])',
        'server.listen[2].tls: "starttls" needs tls.certificates',
    ]


def test_bad_certificates_are_not_taken_for_none(tmp_path):
    path = write(tmp_path, """\
server:
  listen: [{address: "127.0.0.1:2525", tls: starttls, require_tls: true}]
tls:
  certificates: [{cert: 1}]
""")
    assert problems_of(path) == ["tls.certificates[0].cert: must be a non-empty string, got 1",
                                 'tls.certificates[0]: missing key "key"']
