"""Fault injection: configured rules that make a session misbehave on purpose, for load tests.

Untrusted input: at run time the client's address and envelope strings, which are only
lower-cased and matched against precompiled globs and networks, never interpreted. The
rules themselves come from the operator's YAML through faultrules.py, which validates
them.

Theory of operation. Rules are grouped by stage once, in `FaultInjector.__init__`, so a
stage without rules costs one dict lookup. For each check the rules of that stage are
tried in order; the first whose matches all hold and whose `rate` draw fires wins. Which
rules an envelope matches is remembered per stage (a bounded dict keyed by what that
stage's rules look at; envelopes of more than _CACHED_RECIPIENTS recipients are matched
afresh), so repeated senders, recipients and clients cost a lookup. The
random generator is consulted only for a rule that matched and has `rate < 1` (and for a
delay range when that rule fires), so traffic no rule matches neither costs a draw nor
shifts the sequence: with `faults.seed` set, one worker's decisions replay exactly.
Delays are returned as numbers; the worker schedules them on its timers, never sleeps.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from minismtp.smtp.replies import Reply

STAGES = ("connect", "helo", "starttls", "auth", "mail", "rcpt", "data", "end_of_data",
          "quit")
MAX_RULES = 64  # the stats board reserves one counter per rule before any worker forks

_CLIENT_CACHE_MAX = 4096  # (client address, network rule) answers remembered per worker
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
    """Per-worker rule matcher; `stream` (the worker's place in its generation) varies
    the seeded sequence, so each worker of a generation draws its own."""

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
        # (client, rule index) -> whether the client is inside the rule's network. A
        # stage's envelope cache misses whenever the sender or recipients change, but this
        # answer does not depend on them, and parsing the address and testing containment
        # are Python-level ipaddress work. Keyed by the rule's index, not its network:
        # hashing an ipaddress network is itself a Python-level call.
        self._inside: dict[tuple[str, int], bool] = {}

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
