"""Fault injection: configured rules that make a session misbehave on purpose, for load tests.

Untrusted input: the `faults:` section of the operator's YAML (validated here, every
problem reported with its key path, e.g. "faults.rules[1].rate: ..."), and at run time
the client's address and envelope strings, which are only lower-cased and matched
against precompiled globs and networks, never interpreted.

Theory of operation. Rules are grouped by stage once, in `FaultInjector.__init__`, so a
stage without rules costs one dict lookup. For each check the rules of that stage are
tried in order; the first whose matches all hold and whose `rate` draw fires wins. Which
rules an envelope matches is remembered per stage (a bounded dict keyed by what that
stage's rules look at), so repeated senders, recipients and clients cost a lookup. The
random generator is consulted only for a rule that matched and has `rate < 1` (and for a
delay range when that rule fires), so traffic no rule matches neither costs a draw nor
shifts the sequence: with `faults.seed` set, one worker's decisions replay exactly.
Delays are returned as numbers; the worker schedules them on its timers, never sleeps.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from minismtp import values
from minismtp.replies import Reply

STAGES = ("connect", "helo", "mail", "rcpt", "data", "end_of_data", "quit")
MAX_RULES = 64  # the stats board reserves one counter per rule before any worker forks

_RECIPIENT_STAGES = ("rcpt", "data", "end_of_data")  # before RCPT there is no recipient
_SENDER_STAGES = ("mail", "rcpt", "data", "end_of_data", "quit")
_RULE_KEYS = ("name", "stage", "sender", "recipient", "client", "rate", "reply", "delay",
              "disconnect", "tarpit")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)  # a Prometheus label value as is
_CLIENT_CACHE_MAX = 4096  # distinct client addresses remembered per worker
_MATCH_CACHE_MAX = 4096  # envelopes whose matching rules are remembered, per stage
_CACHED_RECIPIENTS = 4  # longer recipient lists are matched afresh, never kept

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class DelayRange:
    min_s: float
    max_s: float  # equal to min_s for a fixed delay


@dataclass(frozen=True, slots=True)
class FaultRule:
    index: int  # position in faults.rules; also the rule's stats counter
    name: str
    stage: str
    sender: str | None  # glob; "" matches the null reverse-path <>
    recipient: str | None  # glob; matches if any recipient matches
    client: Network | None
    rate: float
    reply: Reply | None
    delay: DelayRange | None
    disconnect: bool
    tarpit_bps: float | None


@dataclass(frozen=True, slots=True)
class FaultsConfig:
    seed: int | None = None
    rules: tuple[FaultRule, ...] = ()


@dataclass(frozen=True, slots=True)
class FaultAction:
    """What to do now: wait `delay_s`, then disconnect, or send `reply` (or the normal
    reply when None), at `tarpit_bps` bytes per second when set."""

    rule: FaultRule
    reply: Reply | None
    delay_s: float
    disconnect: bool
    tarpit_bps: float | None


# -- run time --------------------------------------------------------------------------


def _glob(pattern: str) -> Callable[[str], object]:
    # fnmatch.fnmatch would normcase and look up its cache on every call; compile once.
    return re.compile(fnmatch.translate(pattern.lower())).match


class _Armed:
    """A rule ready to match: compiled globs, and its action when it needs no draw."""

    __slots__ = ("rule", "sender", "recipient", "network", "action", "low_s", "high_s")

    def __init__(self, rule: FaultRule) -> None:
        self.rule = rule
        self.sender = None if rule.sender is None else _glob(rule.sender)
        self.recipient = None if rule.recipient is None else _glob(rule.recipient)
        self.network = rule.client
        delay = rule.delay or DelayRange(0.0, 0.0)
        self.low_s, self.high_s = delay.min_s, delay.max_s
        # Made once when nothing varies, so a firing rule allocates nothing.
        self.action = _action(rule, self.low_s) if self.low_s == self.high_s else None


class _StageRules:
    """One stage's rules, and which of them each envelope seen so far matches.

    A load test sends the same few senders and recipients over and over, and a glob or
    network match costs far more than a dict lookup. The key holds only what the stage's
    rules look at, so rules on the client alone are matched once per client address.
    """

    __slots__ = ("rules", "seen", "by_sender", "by_recipients", "by_client")

    def __init__(self, rules: tuple[_Armed, ...]) -> None:
        self.rules = rules
        self.seen: dict[tuple[Any, ...], tuple[_Armed, ...]] = {}
        self.by_sender = any(armed.sender is not None for armed in rules)
        self.by_recipients = any(armed.recipient is not None for armed in rules)
        self.by_client = any(armed.network is not None for armed in rules)


def _action(rule: FaultRule, delay_s: float) -> FaultAction:
    return FaultAction(rule, rule.reply, delay_s, rule.disconnect, rule.tarpit_bps)


class FaultInjector:
    """Per-worker rule matcher; `stream` (e.g. the worker slot) varies the seeded sequence."""

    __slots__ = ("enabled", "stages", "_by_stage", "_rng", "_inside")

    def __init__(self, config: FaultsConfig, stream: int) -> None:
        self.enabled = bool(config.rules)
        by_stage: dict[str, list[_Armed]] = {}
        for rule in config.rules:
            by_stage.setdefault(rule.stage, []).append(_Armed(rule))
        self._by_stage = {stage: _StageRules(tuple(armed)) for stage, armed in by_stage.items()}
        self.stages = frozenset(by_stage)  # stages some rule watches: others need no check()
        # A string seed is hashed (SHA-512) by random.seed, so nearby streams give
        # unrelated sequences, and the result does not depend on PYTHONHASHSEED.
        seed = None if config.seed is None else f"minismtp-faults:{config.seed}:{stream}"
        self._rng = random.Random(seed)
        # (client, network) -> whether the client is inside: a client asks the same
        # question at every stage, and ipaddress containment costs a microsecond.
        self._inside: dict[tuple[str, int], bool] = {}  # keyed by rule index: hashing
        # an ipaddress network is itself a Python-level call

    def check(self, stage: str, client: str, sender: str | None = None,
              recipients: Sequence[str] = ()) -> FaultAction | None:
        """The fault to inject at `stage` for this client and envelope, or None."""
        stage_rules = self._by_stage.get(stage)
        if stage_rules is None:
            return None
        # The key holds only what this stage's rules look at (built here, not in a method:
        # this runs for every command of every session while rules are configured).
        by_recipients = stage_rules.by_recipients
        cacheable = not by_recipients or len(recipients) <= _CACHED_RECIPIENTS
        key = (client if stage_rules.by_client else None,
               sender if stage_rules.by_sender else None,
               tuple(recipients) if by_recipients and cacheable else None)
        matching = stage_rules.seen.get(key) if cacheable else None
        if matching is None:
            matching = tuple(armed for armed in stage_rules.rules
                             if self._matches(armed, client, sender, recipients))
            if cacheable:
                if len(stage_rules.seen) >= _MATCH_CACHE_MAX:
                    stage_rules.seen.clear()  # a bound, not an LRU: a miss only re-matches
                stage_rules.seen[key] = matching
        for armed in matching:
            rule = armed.rule
            if rule.rate < 1.0 and self._rng.random() >= rule.rate:
                continue
            if armed.action is not None:
                return armed.action
            return _action(rule, self._rng.uniform(armed.low_s, armed.high_s))
        return None

    def _matches(self, armed: _Armed, client: str, sender: str | None,
                 recipients: Sequence[str]) -> bool:
        if armed.sender is not None and (sender is None or not armed.sender(sender.lower())):
            return False
        if armed.recipient is not None and not any(
                armed.recipient(recipient.lower()) for recipient in recipients):
            return False
        return armed.network is None or self._client_in(client, armed)

    def _client_in(self, client: str, armed: _Armed) -> bool:
        key = (client, armed.rule.index)
        inside = self._inside.get(key)
        if inside is None:
            network = armed.network
            address = _parse_client(client)
            # An IPv4 address is never in an IPv6 network: `in` alone would compare ints.
            inside = (address is not None and address.version == network.version
                      and address in network)
            if len(self._inside) >= _CLIENT_CACHE_MAX:
                self._inside.clear()  # a bound, not an LRU: misses only cost a parse
            self._inside[key] = inside
        return inside


def _parse_client(client: str) -> Address | None:
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return None  # e.g. a Unix socket peer: no network rule can match it
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d
    return address


# -- configuration ---------------------------------------------------------------------


class RuleProblems(ValueError):
    """Problems inside faults.rules, as (path below the setting, message)."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {message}" for path, message in items))
        self.items = items


def parse_seed(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be an integer >= 0 or null, got {values.got(value)}")
    return value


def parse_rules(value: object) -> tuple[FaultRule, ...]:
    """faults.rules from YAML; raises RuleProblems or ValueError listing what is wrong."""
    if value is None:  # `rules:` with every example commented out
        return ()
    if not isinstance(value, list):
        raise ValueError(f"must be a list of rules, got {values.got(value)}")
    if len(value) > MAX_RULES:
        raise ValueError(f"must have at most {MAX_RULES} rules, got {len(value)}")
    problems: list[tuple[str, str]] = []
    rules = [_Rule(index, item, problems).build() for index, item in enumerate(value)]
    first_use: dict[str, int] = {}
    for rule in rules:
        if rule is None:
            continue
        if rule.name in first_use:
            problems.append((f"[{rule.index}].name", f'duplicate name "{rule.name}" '
                             f"(also faults.rules[{first_use[rule.name]}])"))
        first_use.setdefault(rule.name, rule.index)
    if problems:
        raise RuleProblems(problems)
    return tuple(rule for rule in rules if rule is not None)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # a 400-digit YAML integer
        return None
    return number if math.isfinite(number) else None


class _Rule:
    """One rule mapping being validated; problems go to the shared list with their path."""

    def __init__(self, index: int, raw: object, problems: list[tuple[str, str]]) -> None:
        self.index = index
        self.raw = raw
        self.problems = problems
        self.ok = True

    def problem(self, key: str | None, message: str) -> None:
        self.problems.append((f"[{self.index}]" + (f".{key}" if key else ""), message))
        self.ok = False

    def build(self) -> FaultRule | None:
        raw = self.raw
        if not isinstance(raw, dict):
            self.problem(None, f"must be a mapping with a stage and an action, got {values.got(raw)}")
            return None
        for key in raw:
            if key not in _RULE_KEYS:
                self.problem(str(key), f"unknown key{values.suggest(str(key), list(_RULE_KEYS))}")
        name = self.name(raw.get("name", f"rule{self.index}"))
        stage = self.stage(raw)
        sender = self.glob(raw, "sender", stage, _SENDER_STAGES, allow_empty=True)
        recipient = self.glob(raw, "recipient", stage, _RECIPIENT_STAGES, allow_empty=False)
        client = self.client(raw.get("client"))
        rate = self.rate(raw.get("rate", 1))
        reply = self.reply(raw.get("reply"), stage)
        delay = self.delay(raw.get("delay"))
        disconnect = self.disconnect(raw.get("disconnect", False))
        tarpit = self.tarpit(raw.get("tarpit"))
        self.combination(raw, disconnect)
        if not self.ok:
            return None
        return FaultRule(self.index, name, stage, sender, recipient, client, rate, reply,
                         delay, disconnect, tarpit)

    def name(self, value: object) -> str:
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            self.problem("name", 'must be 1 to 64 letters, digits, "_", "." or "-", '
                         f"got {values.got(value)}")
            return ""
        return value

    def stage(self, raw: dict[Any, Any]) -> str:
        listed = ", ".join(f'"{stage}"' for stage in STAGES)
        if "stage" not in raw:
            self.problem("stage", f"missing; must be one of {listed}")
            return ""
        value = raw["stage"]
        if value not in STAGES:
            hint = values.suggest(value, list(STAGES)) if isinstance(value, str) else ""
            self.problem("stage", f"must be one of {listed}, got {values.got(value)}{hint}")
            return ""
        return str(value)

    def glob(self, raw: dict[Any, Any], key: str, stage: str, stages: tuple[str, ...],
             allow_empty: bool) -> str | None:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not (value or allow_empty):
            self.problem(key, f'must be an address pattern such as "*@example.test", '
                         f"got {values.got(value)}")
            return None
        if stage and stage not in stages:
            self.problem(key, f'cannot match at stage "{stage}": only at {", ".join(stages)}')
        return value

    def client(self, value: object) -> Network | None:
        if value is None:
            return None
        meant = None
        if isinstance(value, str):  # ip_network would take the integer 5 as 0.0.0.5/32
            try:
                return ipaddress.ip_network(value)  # strict: "10.0.0.1/8" is a typo
            except ValueError:
                pass
            try:
                meant = ipaddress.ip_network(value, strict=False)
            except ValueError:
                pass
        self.problem("client", f'has host bits set (did you mean "{meant}"?), got {values.got(value)}'
                     if meant else 'must be a network such as "10.0.0.0/8" or '
                     f'"2001:db8::/32", got {values.got(value)}')
        return None

    def rate(self, value: object) -> float:
        rate = _number(value)
        if rate is None or not 0 <= rate <= 1:
            self.problem("rate", f"must be a number from 0 to 1, got {values.got(value)}")
            return 0.0
        return rate

    def reply(self, value: object, stage: str) -> Reply | None:
        if value is None:
            return None
        allowed = "221 or a 4xx or 5xx" if stage == "quit" else "a 4xx or 5xx"
        want = f'must be {allowed} reply such as "450 4.2.0 Mailbox busy"'
        try:
            if not isinstance(value, str):
                raise ValueError
            reply = Reply.parse(value)
        except ValueError:  # not a reply, bad enhanced code, or non-printable text
            self.problem("reply", f"{want}, got {values.got(value)}")
            return None
        if reply.code < 400 and not (stage == "quit" and reply.code == 221):
            self.problem("reply", f"{want}, got {values.got(value)}")
            return None
        return reply

    def delay(self, value: object) -> DelayRange | None:
        want = 'must be seconds >= 0 such as 0.2 or "200ms", or {min: ..., max: ...}'
        if value is None:
            return None
        if not isinstance(value, dict):
            seconds = values.to_seconds(value)
            if seconds is None or seconds < 0:
                self.problem("delay", f"{want}, got {values.got(value)}")
                return None
            return DelayRange(seconds, seconds)
        bounds: dict[str, float] = {}
        for key in value:
            if key not in ("min", "max"):
                self.problem(f"delay.{key}", 'unknown key (a range has only "min" and "max")')
        for key in ("min", "max"):
            seconds = values.to_seconds(value.get(key))
            if seconds is None or seconds < 0:
                self.problem(f"delay.{key}", 'must be seconds >= 0 such as 0.05 or "50ms", '
                             f"got {values.got(value.get(key))}")
            else:
                bounds[key] = seconds
        if len(bounds) == 2 and bounds["min"] > bounds["max"]:
            self.problem("delay", f"min must not exceed max, got min {values.got(value['min'])} "
                         f"and max {values.got(value['max'])}")
        return DelayRange(bounds["min"], bounds["max"]) if len(bounds) == 2 else None

    def disconnect(self, value: object) -> bool:
        if not isinstance(value, bool):  # "false" in quotes would read as true
            self.problem("disconnect", f"must be true or false, got {values.got(value)}")
            return False
        return value

    def tarpit(self, value: object) -> float | None:
        if value is None:
            return None
        rate = _number(value)
        if rate is None or rate <= 0:
            self.problem("tarpit", f"must be bytes per second > 0, got {values.got(value)}")
            return None
        return rate

    def combination(self, raw: dict[Any, Any], disconnect: bool) -> None:
        # An action given but invalid is reported as such, not also as missing.
        given = [raw.get(key) for key in ("reply", "delay", "tarpit", "disconnect")]
        if all(value is None or value is False for value in given):
            self.problem(None, "needs an action: reply, delay, disconnect: true or tarpit")
        if disconnect:  # a dropped connection sends nothing, so nothing to send slowly
            for key in ("reply", "tarpit"):
                if raw.get(key) is not None:
                    self.problem("disconnect", f"cannot be combined with {key}: "
                                 "a disconnect sends no reply")


def dump_rules(rules: tuple[FaultRule, ...]) -> list[dict[str, object]]:
    """Plain YAML values that parse_rules reads back to equal rules."""
    dumped: list[dict[str, object]] = []
    for rule in rules:
        reply, delay = rule.reply, rule.delay
        optional = {
            "sender": rule.sender,
            "recipient": rule.recipient,
            "client": None if rule.client is None else str(rule.client),
            "rate": None if rule.rate == 1 else rule.rate,
            "reply": None if reply is None else f"{reply.code} {reply.enhanced} {reply.text}",
            "delay": None if delay is None else delay.min_s if delay.min_s == delay.max_s
            else {"min": delay.min_s, "max": delay.max_s},
            "disconnect": True if rule.disconnect else None,
            "tarpit": rule.tarpit_bps,
        }
        dumped.append({"name": rule.name, "stage": rule.stage,
                       **{key: value for key, value in optional.items() if value is not None}})
    return dumped
