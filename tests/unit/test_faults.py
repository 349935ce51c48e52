"""Fault rules: validation with exact key paths, matching, rates, seeds and actions."""

from __future__ import annotations

import ipaddress

import pytest

from minismtp.config import ConfigError, load_config
from minismtp import faults as faults_module
from minismtp.faults import (
    MAX_RULES, STAGES, DelayRange, FaultAction, FaultInjector, FaultsConfig,
)
from minismtp.smtp.replies import Reply


def faults(*rules: dict, seed: int | None = 7) -> FaultsConfig:
    """Rules as the operator writes them, through the real config loader."""
    return load_config(overrides={"faults.rules": list(rules), "faults.seed": seed}).faults


def problems(*rules: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"faults.rules": list(rules)})
    return info.value.problems


def fired(injector: FaultInjector, n: int, stage: str = "rcpt", **kwargs) -> list[bool]:
    kwargs.setdefault("client", "192.0.2.1")
    return [injector.check(stage, **kwargs) is not None for _ in range(n)]


# --- parsing ------------------------------------------------------------------------


def test_defaults_are_no_rules_and_no_seed():
    config = load_config().faults
    assert config == FaultsConfig(None, ())
    assert not FaultInjector(config, 0).enabled


def test_a_full_rule_parses_to_values():
    config = faults({"name": "busy-rcpt", "stage": "rcpt", "sender": "*@x.test",
                     "recipient": "*@reject.test", "client": "10.0.0.0/8", "rate": 0.3,
                     "reply": "450 4.2.0 Mailbox busy", "delay": {"min": 0.05, "max": "500ms"},
                     "tarpit": 50})
    [rule] = config.rules
    assert (rule.index, rule.name, rule.stage) == (0, "busy-rcpt", "rcpt")
    assert (rule.sender, rule.recipient) == ("*@x.test", "*@reject.test")
    assert rule.client == ipaddress.ip_network("10.0.0.0/8")
    assert rule.rate == 0.3
    assert rule.reply == Reply(450, "4.2.0", "Mailbox busy")
    assert rule.delay == DelayRange(0.05, 0.5)
    assert (rule.disconnect, rule.tarpit_bps) == (False, 50.0)
    assert config.seed == 7


def test_defaults_within_a_rule():
    rule, other = faults({"stage": "mail", "delay": 0.2},
                         {"stage": "quit", "disconnect": True}).rules
    assert (rule.name, rule.rate, rule.delay) == ("rule0", 1.0, DelayRange(0.2, 0.2))
    assert (rule.sender, rule.recipient, rule.client, rule.reply) == (None, None, None, None)
    assert (other.name, other.delay, other.disconnect) == ("rule1", None, True)


@pytest.mark.parametrize("rule", [
    {"stage": "quit", "reply": "221 2.0.0 Bye now"},  # 221 is fine at quit
    {"stage": "connect", "reply": "554 5.3.2 No service"},  # a refusing greeting
    {"stage": "connect", "reply": "421"},  # enhanced code and text filled in
    {"stage": "data", "delay": 0.1, "disconnect": True},
    {"stage": "end_of_data", "reply": "451 4.3.0 Try later", "tarpit": 1.5},
    {"stage": "mail", "sender": "", "reply": "550 5.1.0 No bounces"},  # null sender
    {"stage": "helo", "client": "2001:db8::/32", "disconnect": True},
    {"stage": "rcpt", "client": "192.0.2.7", "rate": 0, "delay": "10ms"},
    {"stage": "rcpt", "delay": {"min": 0, "max": "1ms"}, "disconnect": False},
])
def test_valid_rules(rule):
    assert len(faults(rule).rules) == 1


def test_rules_null_means_none_and_seed_is_optional():
    assert load_config(overrides={"faults.rules": None}).faults.rules == ()
    assert faults({"stage": "rcpt", "delay": 1}, seed=None).seed is None


BAD_RULES = [
    ({"stage": "rcpt", "reply": "250 ok"},
     'faults.rules[0].reply: must be a 4xx or 5xx reply such as "450 4.2.0 Mailbox busy", '
     'got "250 ok"'),
    ({"stage": "quit", "reply": "250 2.0.0 ok"},
     'faults.rules[0].reply: must be 221 or a 4xx or 5xx reply such as '
     '"450 4.2.0 Mailbox busy", got "250 2.0.0 ok"'),
    ({"stage": "rcpt", "reply": "450 5.2.0 Busy"},
     'faults.rules[0].reply: must be a 4xx or 5xx reply such as "450 4.2.0 Mailbox busy", '
     'got "450 5.2.0 Busy"'),
    ({"stage": "rcpt", "reply": 450},
     'faults.rules[0].reply: must be a 4xx or 5xx reply such as "450 4.2.0 Mailbox busy", '
     "got 450"),
    ({"stage": "connect", "reply": "450 4.3.2 Busy"},
     'faults.rules[0].reply: at stage connect must be 554 (no service) or 421 (closing): '
     'the greetings RFC 5321 3.1 and 4.3.2 allow besides 220, got "450 4.3.2 Busy"'),
    ({"stage": "connect", "reply": "550 5.7.1 No"},
     'faults.rules[0].reply: at stage connect must be 554 (no service) or 421 (closing): '
     'the greetings RFC 5321 3.1 and 4.3.2 allow besides 220, got "550 5.7.1 No"'),
    ({"stage": "rcpt", "rate": 1.5, "delay": 1},
     "faults.rules[0].rate: must be a number from 0 to 1, got 1.5"),
    ({"stage": "rcpt", "rate": True, "delay": 1},
     "faults.rules[0].rate: must be a number from 0 to 1, got true"),
    ({"stage": "rcpt", "rate": "50%", "delay": 1},
     'faults.rules[0].rate: must be a number from 0 to 1, got "50%"'),
    ({"stage": "rctp", "delay": 1},
     'faults.rules[0].stage: must be one of "connect", "helo", "starttls", "auth", "mail", "rcpt", "data", '
     '"end_of_data", "quit", got "rctp" (did you mean "rcpt"?)'),
    ({"delay": 1},
     'faults.rules[0].stage: missing; must be one of "connect", "helo", "starttls", "auth", "mail", "rcpt", '
     '"data", "end_of_data", "quit"'),
    ({"stage": "rcpt", "disconnect": True, "reply": "450 4.2.0 Busy"},
     "faults.rules[0].disconnect: cannot be combined with reply: a disconnect sends no reply"),
    ({"stage": "rcpt", "disconnect": True, "tarpit": 10},
     "faults.rules[0].disconnect: cannot be combined with tarpit: a disconnect sends no reply"),
    ({"stage": "rcpt"},
     "faults.rules[0]: needs an action: reply, delay (above 0), disconnect: true or tarpit"),
    ({"stage": "rcpt", "disconnect": False},
     "faults.rules[0]: needs an action: reply, delay (above 0), disconnect: true or tarpit"),
    ({"stage": "rcpt", "delay": 0},
     "faults.rules[0]: needs an action: reply, delay (above 0), disconnect: true or tarpit"),
    ({"stage": "rcpt", "delay": {"min": 0, "max": "0s"}},
     "faults.rules[0]: needs an action: reply, delay (above 0), disconnect: true or tarpit"),
    ({"stage": "rcpt", "reply": "450 4.2.0 " + "x" * 501},
     "faults.rules[0].reply: must be at most 512 octets with its CRLF (RFC 5321 4.5.3.1.5), "
     "got 513"),
    ({"stage": "rcpt", "client": "10.0.0.300/8", "delay": 1},
     'faults.rules[0].client: must be a network such as "10.0.0.0/8" or "2001:db8::/32", '
     'got "10.0.0.300/8"'),
    ({"stage": "rcpt", "client": "10.1.2.3/8", "delay": 1},
     'faults.rules[0].client: has host bits set (did you mean "10.0.0.0/8"?), got "10.1.2.3/8"'),
    ({"stage": "rcpt", "client": "::ffff:192.0.2.1/120", "delay": 1},  # host bits too
     'faults.rules[0].client: "::ffff:192.0.2.1/120" is IPv4-mapped, which matches no client '
     '(IPv4 ones are matched as IPv4): write "192.0.2.0/24"'),
    ({"stage": "rcpt", "client": "::ffff:192.0.2.0/120", "delay": 1},
     'faults.rules[0].client: "::ffff:192.0.2.0/120" is IPv4-mapped, which matches no client '
     '(IPv4 ones are matched as IPv4): write "192.0.2.0/24"'),
    ({"stage": "rcpt", "client": 5, "delay": 1},
     'faults.rules[0].client: must be a network such as "10.0.0.0/8" or "2001:db8::/32", '
     "got 5"),
    ({"stage": "helo", "recipient": "*@x.test", "delay": 1},
     'faults.rules[0].recipient: cannot match at stage "helo": only at rcpt, data, end_of_data'),
    ({"stage": "connect", "sender": "*@x.test", "delay": 1},
     'faults.rules[0].sender: cannot match at stage "connect": '
     "only at mail, rcpt, data, end_of_data, quit"),
    ({"stage": "rcpt", "recipient": "", "delay": 1},
     'faults.rules[0].recipient: must be an address pattern such as "*@example.test", got ""'),
    ({"stage": "rcpt", "delay": -1},
     'faults.rules[0].delay: must be seconds from 0 to 3600 such as 0.2 or "200ms", '
     "or {min: ..., max: ...}, got -1"),
    ({"stage": "rcpt", "delay": "2h"},
     'faults.rules[0].delay: must be seconds from 0 to 3600 such as 0.2 or "200ms", '
     'or {min: ..., max: ...}, got "2h"'),
    ({"stage": "rcpt", "delay": {"min": 1, "max": 1.0e300}},
     'faults.rules[0].delay.max: must be seconds from 0 to 3600 such as 0.05 or "50ms", '
     "got 1e+300"),
    ({"stage": "rcpt", "delay": {"min": 0.5, "max": 0.1}},
     "faults.rules[0].delay: min must not exceed max, got min 0.5 and max 0.1"),
    ({"stage": "rcpt", "delay": {"min": 0.1}},
     'faults.rules[0].delay.max: must be seconds from 0 to 3600 such as 0.05 or "50ms", '
     "got null"),
    ({"stage": "rcpt", "delay": {"min": 0, "max": 1, "mean": 0.5}},
     'faults.rules[0].delay.mean: unknown key (a range has only "min" and "max")'),
    ({"stage": "rcpt", "tarpit": 0},
     "faults.rules[0].tarpit: must be bytes per second, at least 1, got 0"),
    ({"stage": "rcpt", "tarpit": 0.01},
     "faults.rules[0].tarpit: must be bytes per second, at least 1, got 0.01"),
    ({"stage": "rcpt", "disconnect": "yes"},
     'faults.rules[0].disconnect: must be true or false, got "yes"'),
    ({"stage": "rcpt", "delay": 1, "replay": "450 4.2.0 Busy"},
     'faults.rules[0].replay: unknown key (did you mean "reply"?)'),
    ({"stage": "rcpt", "delay": 1, "name": "busy rcpt"},
     'faults.rules[0].name: must be 1 to 64 letters, digits, "_", "." or "-", got "busy rcpt"'),
    ("rcpt", 'faults.rules[0]: must be a mapping with a stage and an action, got "rcpt"'),
]


@pytest.mark.parametrize(("rule", "expected"), BAD_RULES)
def test_bad_rule_gives_one_exact_line(rule, expected):
    assert problems(rule) == [expected]


def test_problems_name_the_rule_index():
    assert problems({"stage": "rcpt", "delay": 1}, {"stage": "rcpt", "rate": 1.5, "delay": 1}) \
        == ["faults.rules[1].rate: must be a number from 0 to 1, got 1.5"]


def test_duplicate_names_including_a_default_one():
    assert problems({"name": "busy", "stage": "rcpt", "delay": 1},
                    {"name": "busy", "stage": "mail", "delay": 1},
                    {"name": "rule3", "stage": "mail", "delay": 1},
                    {"stage": "mail", "delay": 1}) == [
        'faults.rules[1].name: duplicate name "busy" (also faults.rules[0])',
        'faults.rules[3].name: duplicate name "rule3" (also faults.rules[2])',
    ]


def test_every_problem_of_a_rule_is_reported():
    assert problems({"stage": "helo", "recipient": "*@x", "rate": 2, "reply": "250 ok"}) == [
        'faults.rules[0].recipient: cannot match at stage "helo": only at rcpt, data, end_of_data',
        "faults.rules[0].rate: must be a number from 0 to 1, got 2",
        'faults.rules[0].reply: must be a 4xx or 5xx reply such as "450 4.2.0 Mailbox busy", '
        'got "250 ok"',
    ]


@pytest.mark.parametrize(("value", "expected"), [
    ({"stage": "rcpt"}, "faults.rules: must be a list of rules, got a mapping"),
    ([{"stage": "rcpt", "delay": 1}] * (MAX_RULES + 1),
     f"faults.rules: must have at most {MAX_RULES} rules, got {MAX_RULES + 1}"),
])
def test_rules_must_be_a_short_list(value, expected):
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"faults.rules": value})
    assert info.value.problems == [expected]


@pytest.mark.parametrize("seed", [-1, 1.5, "7", True])
def test_bad_seed(seed):
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"faults.seed": seed})
    [problem] = info.value.problems
    assert problem.startswith("faults.seed: must be an integer >= 0 or null, got ")


# --- matching -----------------------------------------------------------------------


def test_rate_fires_about_that_often_and_replays_with_the_seed():
    config = faults({"stage": "rcpt", "rate": 0.3, "reply": "450 4.2.0 Busy"}, seed=42)
    first = fired(FaultInjector(config, 3), 2000, recipients=["a@b.test"])
    assert 0.25 * 2000 <= sum(first) <= 0.35 * 2000
    assert fired(FaultInjector(config, 3), 2000, recipients=["a@b.test"]) == first


def test_streams_and_seeds_give_different_sequences():
    config = faults({"stage": "rcpt", "rate": 0.5, "delay": 1}, seed=42)
    base = fired(FaultInjector(config, 0), 200)
    assert fired(FaultInjector(config, 1), 200) != base
    other_seed = faults({"stage": "rcpt", "rate": 0.5, "delay": 1}, seed=43)
    assert fired(FaultInjector(other_seed, 0), 200) != base


def test_unseeded_injectors_differ():
    config = faults({"stage": "rcpt", "rate": 0.5, "delay": 1}, seed=None)
    assert fired(FaultInjector(config, 0), 200) != fired(FaultInjector(config, 0), 200)


def test_traffic_no_rule_matches_draws_nothing():
    config = faults({"stage": "rcpt", "recipient": "*@busy.test", "rate": 0.5, "delay": 1},
                    {"stage": "mail", "client": "10.0.0.0/8", "rate": 0.5, "delay": 1})
    plain = FaultInjector(config, 0)
    expected = fired(plain, 300, recipients=["x@busy.test"])
    noisy = FaultInjector(config, 0)
    got = []
    for _ in range(300):
        assert noisy.check("helo", "10.1.1.1") is None  # no rule for the stage
        assert noisy.check("data", "10.1.1.1", "s@x", ["x@busy.test"]) is None
        assert noisy.check("rcpt", "10.1.1.1", "s@x", ["x@other.test"]) is None
        assert noisy.check("mail", "192.0.2.1", "s@x") is None  # client outside the net
        got.append(noisy.check("rcpt", "192.0.2.1", recipients=["x@busy.test"]) is not None)
    assert got == expected


def test_recipient_glob_fires_exactly_for_matching_recipients():
    injector = FaultInjector(faults({"stage": "rcpt", "recipient": "*@Reject.test",
                                     "reply": "550 5.1.1 No"}), 0)
    for recipient, hit in [("a@reject.test", True), ("B@REJECT.TEST", True),
                           ("a@reject.test.example", False), ("a@accept.test", False),
                           ("reject.test", False)]:
        assert (injector.check("rcpt", "192.0.2.1", "s@x", [recipient]) is not None) is hit
    # In DATA the whole list is passed: any match fires.
    injector = FaultInjector(faults({"stage": "data", "recipient": "*@reject.test",
                                     "reply": "554 5.7.1 No"}), 0)
    assert injector.check("data", "192.0.2.1", "s@x", ["a@ok.test", "b@reject.test"])
    assert injector.check("data", "192.0.2.1", "s@x", ["a@ok.test"]) is None
    assert injector.check("data", "192.0.2.1", "s@x", []) is None


def test_sender_glob_and_null_sender():
    injector = FaultInjector(faults({"stage": "mail", "sender": "", "reply": "550 5.1.0 No"},
                                    {"stage": "mail", "sender": "spam?@*", "disconnect": True}), 0)
    assert injector.check("mail", "192.0.2.1", "").rule.index == 0
    assert injector.check("mail", "192.0.2.1", "SPAM1@x.test").rule.index == 1
    assert injector.check("mail", "192.0.2.1", "spam12@x.test") is None
    assert injector.check("mail", "192.0.2.1", None) is None  # no sender known


@pytest.mark.parametrize(("network", "client", "hit"), [
    ("10.0.0.0/8", "10.200.3.4", True),
    ("10.0.0.0/8", "11.0.0.1", False),
    ("10.0.0.0/8", "::ffff:10.0.0.1", True),  # IPv4 client on a dual-stack socket
    ("10.0.0.0/8", "::1", False),
    ("::/0", "10.0.0.1", False),  # versions never mix
    ("2001:db8::/32", "2001:db8:1::5", True),
    ("192.0.2.7", "192.0.2.7", True),
    ("10.0.0.0/8", "", False),  # a Unix socket peer has no address
    ("10.0.0.0/8", "not-an-ip", False),
])
def test_client_network(network, client, hit):
    injector = FaultInjector(faults({"stage": "connect", "client": network, "delay": 1}), 0)
    assert (injector.check("connect", client) is not None) is hit
    assert (injector.check("connect", client) is not None) is hit  # again, from the cache


def test_only_rules_of_the_stage_apply_and_the_first_match_wins():
    injector = FaultInjector(faults(
        {"name": "a", "stage": "rcpt", "recipient": "*@a.test", "reply": "450 4.2.0 A"},
        {"name": "b", "stage": "rcpt", "reply": "451 4.3.0 B"},
        {"name": "c", "stage": "rcpt", "reply": "452 4.3.1 C"},
        {"name": "q", "stage": "quit", "reply": "221 2.0.0 Bye"},
    ), 0)
    assert injector.enabled
    assert injector.check("rcpt", "192.0.2.1", None, ["x@a.test"]).rule.name == "a"
    assert injector.check("rcpt", "192.0.2.1", None, ["x@b.test"]).rule.name == "b"
    assert injector.check("quit", "192.0.2.1").reply.code == 221
    for stage in set(STAGES) - {"rcpt", "quit"}:
        assert injector.check(stage, "192.0.2.1", "s@x", ["x@a.test"]) is None
    assert injector.check("bogus", "192.0.2.1") is None


def test_remembered_matches_give_the_same_answers_as_fresh_ones():
    config = faults(
        {"name": "s", "stage": "data", "sender": "*@bad.test", "reply": "550 5.7.1 S"},
        {"name": "r", "stage": "data", "recipient": "x*@t.test", "reply": "550 5.7.1 R"},
        {"name": "c", "stage": "data", "client": "10.0.0.0/8", "reply": "450 4.7.1 C"},
    )
    cases = [
        ("192.0.2.1", "a@bad.test", ["y@t.test"], "s"),
        ("192.0.2.1", "a@ok.test", ["y@t.test"], None),
        ("192.0.2.1", "a@ok.test", ["y@t.test", "x1@t.test"], "r"),
        ("192.0.2.1", "a@ok.test", [f"y{i}@t.test" for i in range(9)] + ["x@t.test"], "r"),
        ("192.0.2.1", "a@ok.test", [f"y{i}@t.test" for i in range(10)], None),  # not kept
        ("10.1.2.3", "a@ok.test", ["y@t.test"], "c"),
        ("10.1.2.3", "A@BAD.TEST", ["y@t.test"], "s"),
    ]
    warm = FaultInjector(config, 0)
    for _ in range(3):  # the second and third rounds come from the cache
        for client, sender, recipients, name in cases:
            action = warm.check("data", client, sender, recipients)
            assert (action and action.rule.name) == name, (client, sender, recipients)
            fresh = FaultInjector(config, 0).check("data", client, sender, recipients)
            assert (fresh and fresh.rule.name) == name


def test_a_stage_remembers_only_what_its_rules_look_at():
    injector = FaultInjector(faults({"stage": "end_of_data", "client": "10.0.0.0/8",
                                     "delay": 1}), 0)
    for i in range(50):  # many senders and recipients, two clients: two entries
        assert injector.check("end_of_data", "10.0.0.1", f"s{i}@x", [f"r{i}@y"])
        assert injector.check("end_of_data", "192.0.2.1", f"s{i}@x", [f"r{i}@y"]) is None
    assert len(injector._by_stage["end_of_data"].seen) == 2


def test_the_match_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(faults_module, "_MATCH_CACHE_MAX", 8)
    injector = FaultInjector(faults({"stage": "mail", "sender": "*@bad.test",
                                     "reply": "550 5.7.1 No"}), 0)
    for i in range(100):  # a client sending a new sender every time
        assert injector.check("mail", "192.0.2.1", f"u{i}@ok.test") is None
        assert len(injector._by_stage["mail"].seen) <= 8
    assert injector.check("mail", "192.0.2.1", "u1@bad.test") is not None


def test_rate_zero_never_fires():
    injector = FaultInjector(faults({"stage": "rcpt", "rate": 0, "delay": 1}), 0)
    assert not any(fired(injector, 100))


# --- actions ------------------------------------------------------------------------


def test_delay_range_draws_within_bounds_and_replays():
    config = faults({"stage": "end_of_data", "delay": {"min": 0.05, "max": 0.5}}, seed=9)
    delays = [FaultInjector(config, 0).check("end_of_data", "h").delay_s for _ in range(3)]
    assert len(set(delays)) == 1  # same seed, same first draw
    injector = FaultInjector(config, 0)
    drawn = [injector.check("end_of_data", "h").delay_s for _ in range(500)]
    assert all(0.05 <= d <= 0.5 for d in drawn)
    assert max(drawn) - min(drawn) > 0.3  # spread over the range, not one value


@pytest.mark.parametrize(("rule", "shape"), [
    ({"stage": "rcpt", "reply": "450 4.2.0 Busy"},
     (Reply(450, "4.2.0", "Busy"), 0.0, False, None)),
    ({"stage": "rcpt", "delay": 0.2}, (None, 0.2, False, None)),
    ({"stage": "rcpt", "disconnect": True}, (None, 0.0, True, None)),
    ({"stage": "rcpt", "tarpit": 50}, (None, 0.0, False, 50.0)),
    ({"stage": "rcpt", "reply": "550 5.7.1 Go away", "tarpit": 5, "delay": "1.5s"},
     (Reply(550, "5.7.1", "Go away"), 1.5, False, 5.0)),
    ({"stage": "rcpt", "delay": 0.3, "disconnect": True}, (None, 0.3, True, None)),
])
def test_action_shapes(rule, shape):
    config = faults(rule)
    action = FaultInjector(config, 0).check("rcpt", "192.0.2.1", "s@x", ["r@x"])
    assert isinstance(action, FaultAction)
    assert action.rule is config.rules[0]
    assert (action.reply, action.delay_s, action.disconnect, action.tarpit_bps) == shape
    assert action.reply is None or action.reply.wire.endswith(b"\r\n")
