"""faults.rules and faults.seed from the operator's YAML: validated, or every problem named.

Untrusted input: the `faults:` section of the operator's YAML. Every problem is reported,
all of them at once, with its path inside the setting ("[1].rate"); config.py puts the
setting's name in front ("faults.rules[1].rate: ..."). The rules come out as the frozen `FaultRule` values that
faults.py arms at run time, and `dump_rules` writes them back as YAML would hold them.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any

from minismtp import values
from minismtp.faults import MAX_RULES, STAGES, DelayRange, FaultRule, Network
from minismtp.smtp.replies import Reply

# A session waiting out a delay is not read (a client that leaves is seen when it ends),
# so a delay is bounded; as is a tarpit's slowness, by its least rate.
MAX_DELAY_S = 3600.0
MAX_REPLY_BYTES = 512  # RFC 5321 4.5.3.1.5: a reply line, CRLF included
_RECIPIENT_STAGES = ("rcpt", "data", "end_of_data")  # before RCPT there is no recipient
_SENDER_STAGES = ("mail", "rcpt", "data", "end_of_data", "quit")
_REFUSING_GREETINGS = (421, 554)  # RFC 5321 3.1, 4.3.2: a greeting is 220, 554 or 421
_RULE_KEYS = ("name", "stage", "sender", "recipient", "client", "rate", "reply", "delay",
              "disconnect", "tarpit")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)  # a Prometheus label value as is


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
    return int(value)  # plain, whatever int type the loader made (values.OctalInt)


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
        self.combination(raw, disconnect, delay)
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
                meant = ipaddress.ip_network(value, strict=False)
                network = ipaddress.ip_network(value)  # strict: "10.0.0.1/8" is a typo
            except ValueError:
                network = None
            if meant is not None and (problem := values.mapped_network_problem(meant)):
                self.problem("client", f"{values.got(value)} is {problem}")  # the IPv4 form
                return None
            if network is not None:
                return network
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
        if stage == "connect" and reply.code not in _REFUSING_GREETINGS:
            # A client reads any other code as a broken greeting, not as a refusal.
            self.problem("reply", "at stage connect must be 554 (no service) or 421 "
                         "(closing): the greetings RFC 5321 3.1 and 4.3.2 allow besides "
                         f"220, got {values.got(value)}")
            return None
        if len(reply.wire) > MAX_REPLY_BYTES:
            self.problem("reply", f"must be at most {MAX_REPLY_BYTES} octets with its CRLF "
                         f"(RFC 5321 4.5.3.1.5), got {len(reply.wire)}")
            return None
        return reply

    def delay(self, value: object) -> DelayRange | None:
        want = (f'must be seconds from 0 to {MAX_DELAY_S:.0f} such as 0.2 or "200ms", or '
                '{min: ..., max: ...}')
        if value is None:
            return None
        if not isinstance(value, dict):
            seconds = values.to_seconds(value)
            if seconds is None or not 0 <= seconds <= MAX_DELAY_S:
                self.problem("delay", f"{want}, got {values.got(value)}")
                return None
            return DelayRange(seconds, seconds)
        bounds: dict[str, float] = {}
        for key in value:
            if key not in ("min", "max"):
                self.problem(f"delay.{key}", 'unknown key (a range has only "min" and "max")')
        for key in ("min", "max"):
            seconds = values.to_seconds(value.get(key))
            if seconds is None or not 0 <= seconds <= MAX_DELAY_S:
                self.problem(f"delay.{key}", f"must be seconds from 0 to {MAX_DELAY_S:.0f} "
                             f'such as 0.05 or "50ms", got {values.got(value.get(key))}')
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
        if rate is None or rate < 1:
            self.problem("tarpit", f"must be bytes per second, at least 1, got {values.got(value)}")
            return None
        return rate

    def combination(self, raw: dict[Any, Any], disconnect: bool,
                    delay: DelayRange | None) -> None:
        # An action given but invalid is reported as such, not also as missing. A delay
        # of nothing (0, or a range of 0 to 0) does nothing: no action on its own.
        given = [raw.get(key) for key in ("reply", "tarpit", "disconnect")]
        given.append(None if delay is not None and delay.max_s == 0 else raw.get("delay"))
        if all(value is None or value is False for value in given):
            self.problem(None, "needs an action: reply, delay (above 0), disconnect: true "
                         "or tarpit")
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
