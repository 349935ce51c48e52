"""Listener profiles (profiles.py): name, hostname, limits and faults of a server.listen
entry; what a listener overrides and what it inherits; every problem with its path."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from minismtp import profiles
from minismtp.cli import main
from minismtp.config import ConfigError, dump_config, load_config
from minismtp.faults import MAX_RULES
from minismtp.session import Profile, protocol_settings
from minismtp.stats import ListenerCounts

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc" / "profiles.yaml"


def config_of(tmp_path: Path, text: str):
    path = tmp_path / "minismtp.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_config(path)


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_of(tmp_path, text)
    return info.value.problems


TWO = """\
server:
  hostname: top.example.org
  listen:
    - address: "127.0.0.1:2525"
      name: mx
      hostname: mx.example.org
      limits: {max_message_size: 50M, max_recipients: 100, command_timeout: 20s}
    - "127.0.0.1:2526"
limits:
  max_message_size: 10M
  max_errors: 7
  data_timeout: 1m
"""


# --- parsing and merging ----------------------------------------------------------------


def test_a_listener_overrides_what_it_names_and_inherits_the_rest(tmp_path):
    config = config_of(tmp_path, TWO)
    mx, plain = config.server.listen
    assert (mx.name, mx.hostname) == ("mx", "mx.example.org")
    assert mx.limits == (("max_message_size", 50 << 20), ("max_recipients", 100),
                         ("command_timeout", 20.0))
    limits = profiles.effective_limits(config.limits, mx)
    assert (limits.max_message_size, limits.max_recipients, limits.command_timeout) \
        == (50 << 20, 100, 20.0)
    assert (limits.max_errors, limits.data_timeout) == (7, 60.0)  # from the top level
    assert profiles.effective_limits(config.limits, plain) is config.limits

    settings = protocol_settings(config, mx)
    assert (settings.hostname, settings.max_message_bytes, settings.max_recipients,
            settings.max_errors) == ("mx.example.org", 50 << 20, 100, 7)
    other = protocol_settings(config, plain)
    assert (other.hostname, other.max_message_bytes, other.max_recipients) \
        == ("top.example.org", 10 << 20, 1000)


def test_a_profile_carries_the_listeners_deadlines(tmp_path):
    config = config_of(tmp_path, TWO)
    mx, plain = (Profile(config, entry, ListenerCounts(), tls=False)
                 for entry in config.server.listen)
    assert (mx.name, mx.hostname, mx.command_timeout, mx.data_timeout) \
        == ("mx", "mx.example.org", 20.0, 60.0)
    assert (plain.name, plain.hostname, plain.command_timeout) \
        == ("127.0.0.1:2526", "top.example.org", 300.0)
    assert mx.settings.max_recipients == 100 and not mx.implicit_tls


def test_a_changed_top_level_limit_reaches_only_listeners_that_inherit_it(tmp_path):
    before = config_of(tmp_path, TWO)
    after = config_of(tmp_path, TWO.replace("max_message_size: 10M", "max_message_size: 20M")
                      .replace("max_errors: 7", "max_errors: 9"))
    assert before != after  # a reload sees the change
    for config, size, errors in ((before, 10, 7), (after, 20, 9)):
        mx, plain = (protocol_settings(config, entry) for entry in config.server.listen)
        assert (mx.max_message_bytes, mx.max_errors) == (50 << 20, errors)
        assert (plain.max_message_bytes, plain.max_errors) == (size << 20, errors)


def test_the_default_name_is_the_address(tmp_path):
    config = config_of(tmp_path, """\
    server:
      listen: ["127.0.0.1:2525", {address: "[::1]:2526"}, "127.0.0.1:0", "127.0.0.1:0"]
    """)
    assert [entry.name for entry in config.server.listen] == [
        "127.0.0.1:2525", "[::1]:2526", "127.0.0.1:0", "127.0.0.1:0"]


def test_a_listener_faults_replace_the_top_level_ones_and_count_after_them(tmp_path):
    config = config_of(tmp_path, """\
    server:
      listen:
        - "127.0.0.1:2525"
        - address: "127.0.0.1:2526"
          name: chaos
          faults:
            seed: 3
            rules:
              - {stage: rcpt, reply: "450 4.2.0 busy"}
              - {name: drop, stage: mail, disconnect: true}
        - address: "127.0.0.1:2527"
          name: calm
          faults: {rules: []}
    faults:
      rules: [{name: slow, stage: end_of_data, delay: 1}]
    """)
    plain, chaos, calm = config.server.listen
    faults = {entry.name: profiles.effective_faults(config.faults, entry)
              for entry in config.server.listen}
    assert faults["127.0.0.1:2525"] is config.faults and faults["calm"].rules == ()
    assert faults["chaos"].seed == 3
    # Counted after the top-level rule: one array of counters per worker.
    assert [(rule.index, rule.name) for rule in faults["chaos"].rules] \
        == [(1, "rule0"), (2, "drop")]
    assert [rule.index for rule in config.faults.rules] == [0]


@pytest.mark.parametrize(("faults", "seed", "rules"), [
    ("null", 7, ["busy"]),
    ("{}", 7, ["busy"]),
    ("{seed: 9}", 9, ["busy"]),
    ("{seed: null}", None, ["busy"]),
    ("{rules: [{name: own, stage: helo, delay: 1}]}", 7, ["own"]),
    ("{rules: []}", 7, []),
    ("{seed: 9, rules: []}", 9, []),
])
def test_a_listener_inherits_each_faults_key_it_does_not_give(tmp_path, faults, seed, rules):
    config = config_of(tmp_path, f"""\
    server:
      listen:
        - {{address: "127.0.0.1:2525", name: mx, faults: {faults}}}
    faults:
      seed: 7
      rules: [{{name: busy, stage: rcpt, reply: "450 4.2.0 busy"}}]
    """)
    [entry] = config.server.listen
    effective = profiles.effective_faults(config.faults, entry)
    assert (effective.seed, [rule.name for rule in effective.rules]) == (seed, rules)
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config), encoding="utf-8")
    assert load_config(again) == config


def test_inherited_rules_count_where_the_top_level_ones_do(tmp_path):
    """A listener that gives only a seed draws its own sequence for the top-level rules,
    counted under their top-level names; its own rules come after them."""
    from minismtp.arbiter import rule_names

    config = config_of(tmp_path, """\
    server:
      listen:
        - {address: "127.0.0.1:2525", name: seeded, faults: {seed: 1}}
        - address: "127.0.0.1:2526"
          name: own
          faults: {rules: [{name: slow, stage: helo, delay: 1}]}
    faults:
      rules: [{name: busy, stage: rcpt, reply: "450 4.2.0 busy"}]
    """)
    seeded, own = config.server.listen
    assert [rule.index for rule in profiles.effective_faults(config.faults, seeded).rules] \
        == [0]
    assert [rule.index for rule in profiles.effective_faults(config.faults, own).rules] == [1]
    assert rule_names(config) == ("busy", ("own", "slow"))


def test_null_limits_or_faults_override_nothing(tmp_path):
    """As for a top-level section whose every key is commented out."""
    config = config_of(tmp_path, """\
    server:
      listen:
        - {address: "127.0.0.1:2525", limits: null, faults: null}
    faults:
      rules: [{stage: helo, delay: 1}]
    """)
    [entry] = config.server.listen
    assert (entry.limits, entry.faults) == ((), ())


def test_a_dumped_config_with_profiles_reads_back_equal(tmp_path):
    config = load_config(EXAMPLE)
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config), encoding="utf-8")
    assert load_config(again) == config


def test_the_example_passes_check_config(capsys):
    assert main(["check-config", "--config", str(EXAMPLE)]) == 0
    config = load_config(EXAMPLE)
    assert [entry.name for entry in config.server.listen] == ["mx", "strict", "chaos"]
    mx, strict, chaos = config.server.listen
    assert mx.hostname == "mx.example.org" and strict.hostname is None
    assert protocol_settings(config, strict).max_message_bytes == 64 << 10
    assert [rule.name for rule in profiles.own_rules(chaos)] == ["busy", "flaky", "slow"]
    assert config.faults.rules == ()


# --- problems, each with its path ------------------------------------------------------


def test_bad_values_in_a_listener_are_named_with_its_path(tmp_path):
    assert problems_of(tmp_path, """\
    server:
      listen:
        - "127.0.0.1:2525"
        - address: "127.0.0.1:2526"
          name: "a b"
          hostname: "mx example"
          limits: {max_recipients: ten, max_recipent: 5, bare_lf: sometimes}
          faults:
            sed: 1
            rules: [{stage: rcpt, rate: 2, reply: "450 4.2.0 busy"}]
    """) == [
        'server.listen[1].name: must be 1 to 64 letters, digits, "_", ".", ":" or "-", '
        'got "a b"',
        'server.listen[1].hostname: must be a host name of printable ASCII, no spaces, '
        'got "mx example"',
        'server.listen[1].limits.max_recipients: must be an integer >= 1, got "ten"',
        'server.listen[1].limits.max_recipent: unknown key (did you mean "max_recipients"?)',
        'server.listen[1].limits.bare_lf: must be one of "normalize", "reject", "accept", '
        'got "sometimes"',
        'server.listen[1].faults.sed: unknown key (did you mean "seed"?)',
        "server.listen[1].faults.rules[0].rate: must be a number from 0 to 1, got 2",
    ]


@pytest.mark.parametrize(("entry", "problem"), [
    ("limits: 5", "server.listen[0].limits: must be a mapping of limits (as the top-level "
                  "limits section), got 5"),
    ("faults: [1]", "server.listen[0].faults: must be a mapping (seed, rules) as the "
                    "top-level faults section, got a list"),
    ("faults: {rules: 3}", "server.listen[0].faults.rules: must be a list of rules, got 3"),
    ("faults: {seed: -1}", "server.listen[0].faults.seed: must be an integer >= 0 or null, "
                           "got -1"),
    ("colour: blue", "server.listen[0].colour: unknown key"),
    ('faults: {rules: [{stage: connect, reply: "451 4.3.0 Later"}]}',
     "server.listen[0].faults.rules[0].reply: at stage connect must be 554 (no service) or "
     "421 (closing): the greetings RFC 5321 3.1 and 4.3.2 allow besides 220, got "
     '"451 4.3.0 Later"'),
])
def test_wrong_shapes(tmp_path, entry, problem):
    assert problems_of(tmp_path, f"""\
    server:
      listen:
        - address: "127.0.0.1:2525"
          {entry}
    """) == [problem]


def test_names_must_be_unique(tmp_path):
    assert problems_of(tmp_path, """\
    server:
      listen:
        - {address: "127.0.0.1:2525", name: mx}
        - {address: "127.0.0.1:2526", name: mx}
        - "127.0.0.1:2527"
        - {address: "127.0.0.1:2528", name: "127.0.0.1:2527"}
        - "127.0.0.1:0"
        - {address: "127.0.0.1:0", hostname: b.example}
        - {address: "127.0.0.1:0", name: x}
        - {address: "127.0.0.1:0", name: x}
    """) == [
        'server.listen[1].name: duplicate name "mx" (also server.listen[0])',
        'server.listen[3].name: duplicate name "127.0.0.1:2527" (also server.listen[2])',
        # repeats of a port-0 address may share the name they are given by default only
        'server.listen[7].name: duplicate name "x" (also server.listen[6])',
    ]


def test_fault_rules_in_all_are_bounded(tmp_path):
    rule = '{stage: mail, delay: 0.1}'
    half = MAX_RULES // 2
    assert problems_of(tmp_path, f"""\
    server:
      listen:
        - address: "127.0.0.1:2525"
          faults: {{rules: [{", ".join([rule] * half)}]}}
    faults:
      rules: [{", ".join([rule] * (half + 1))}]
    """) == [
        f"server.listen[0].faults.rules: at most {MAX_RULES} fault rules in all "
        f"(faults.rules and every listener's together), got {MAX_RULES + 1} so far"]


def test_a_top_level_only_limit_is_refused_with_why(tmp_path, monkeypatch):
    """Limits shared across listeners are top-level only: one line in
    TOP_LEVEL_ONLY_LIMITS refuses one on a listener, naming it and why."""
    monkeypatch.setitem(profiles.TOP_LEVEL_ONLY_LIMITS, "max_errors",
                        "counted across every listener")
    assert problems_of(tmp_path, """\
    server:
      listen:
        - address: "127.0.0.1:2525"
          limits: {max_errors: 3, max_error: 4}
    """) == [
        "server.listen[0].limits.max_errors: top-level only (limits.max_errors): "
        "counted across every listener",
        "server.listen[0].limits.max_error: unknown key",
    ]
    assert config_of(tmp_path, "limits: {max_errors: 3}\n").limits.max_errors == 3


def test_too_many_listeners(tmp_path):
    ports = ", ".join(f'"127.0.0.1:{2000 + n}"' for n in range(65))
    assert problems_of(tmp_path, f"server:\n  listen: [{ports}]\n") == [
        "server.listen: must have at most 64 entries, got 65"]


def test_dump_keeps_only_what_a_listener_overrides(tmp_path):
    config = config_of(tmp_path, TWO)
    mx, plain = config.server.listen
    dumpers = {"max_message_size": lambda size: f"{size >> 20}M"}
    assert profiles.dump_profile(mx, dumpers) == {
        "name": "mx", "hostname": "mx.example.org",
        "limits": {"max_message_size": "50M", "max_recipients": 100, "command_timeout": 20.0}}
    assert profiles.dump_profile(plain, dumpers) == {}
    renamed = dataclasses.replace(plain, name="other")
    assert profiles.dump_profile(renamed, dumpers) == {"name": "other"}


# --- a worker's profiles ----------------------------------------------------------------


def test_a_worker_makes_one_profile_per_listener_and_faults_per_listener(tmp_path):
    """Profiles are made once, at the worker's start: one per listener however many of
    its sockets the worker holds (reuse_port), each bound to that listener's counters;
    a listener with faults of its own gets its own rules, the others share the
    top-level ones."""
    import socket

    from minismtp.delivery.null import DiscardBackend
    from minismtp.heartbeat import HeartbeatBoard
    from minismtp.smtp.events import Hello, RcptTo
    from minismtp.stats import StatsBoard
    from minismtp.worker import Worker

    config = config_of(tmp_path, """\
    server:
      listen:
        - {address: "127.0.0.1:2525", name: mx, limits: {command_timeout: 20s}}
        - address: "127.0.0.1:2526"
          name: chaos
          faults: {rules: [{stage: rcpt, reply: "450 4.2.0 busy"}]}
        - {address: "127.0.0.1:2527", name: seeded, faults: {seed: 5}}
    faults:
      rules: [{stage: helo, delay: 1}]
    """)
    mx, chaos, seeded = config.server.listen
    socks = [socket.socket() for _ in range(4)]
    board, stats_board = HeartbeatBoard(1), StatsBoard(1, MAX_RULES)
    worker = Worker(config, [(socks[0], mx), (socks[1], mx), (socks[2], chaos),
                             (socks[3], seeded)],
                    DiscardBackend(), board, 0, stats_board)
    try:
        first, second, own, reseeded = (worker.profiles[sock] for sock in socks)
        # Its own seed, the top-level rules: a sequence of its own for the HELO rule.
        assert reseeded.decide is not worker.decide
        assert reseeded.handlers[Hello] == reseeded.decide.hello
        assert first is second and first is not own
        assert (first.name, first.command_timeout, own.name, own.command_timeout) \
            == ("mx", 20.0, "chaos", 300.0)
        assert first.counts is worker.stats.listeners[0]
        assert own.counts is worker.stats.listeners[1]
        assert first.decide is worker.decide and own.decide is not worker.decide
        # The top-level rule watches HELO on mx only; chaos's own watches RCPT only.
        assert first.handlers[Hello] == worker.decide.hello
        assert own.handlers[Hello] != own.decide.hello
        assert own.handlers[RcptTo] == own.decide.rcpt
        assert first.handlers[RcptTo] != worker.decide.rcpt
    finally:
        worker.poller.close()
        worker.wakeup.close()
        for sock in socks:
            sock.close()
        board.close()
        stats_board.close()


def test_per_client_limits_are_top_level_only(tmp_path):
    assert problems_of(tmp_path, """\
    server:
      listen:
        - address: "127.0.0.1:2525"
          limits: {per_client: {max_sessions: 3}}
    """) == [
        "server.listen[0].limits.per_client: top-level only (limits.per_client): "
        "a client's sessions are counted across every listener and worker",
    ]
    assert config_of(tmp_path, "limits: {per_client: {max_sessions: 3}}\n"
                     ).limits.per_client.max_sessions == 3
