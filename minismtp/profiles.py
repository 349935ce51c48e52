"""A listener's profile: the `name`, `hostname`, `limits` and `faults` keys of a
`server.listen` mapping, parsed, checked against the other listeners, and merged with the
top-level sections.

Untrusted input: the operator's YAML (a listener mapping's values). As everywhere in the
configuration, every problem is reported at once with its path below the listener
(".limits.max_recipients"); values.py puts "server.listen[1]" in front.

Theory of operation. A listener holds only what it overrides: `limits` and `faults` as
(key, value) pairs in the order of the top-level section (a listener's `rules` replace
the top-level ones, they do not add to them), `hostname` as a name or None. What is not
overridden comes from the top level, merged by `effective_limits` and `effective_faults`
once per worker at start (session.Profile), never per session, so a reload that changes
a top-level key changes it for every listener that does not override it. Fault rules
are counted by index in one array per worker (stats.py), so `resolve` numbers each
listener's own rules after the top-level ones and the listeners before it; the sum is
bounded as the top-level list is. A listener that inherits the top-level rules (giving
only a `seed`, say) counts them where the top-level ones count.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from minismtp.faultrules import RuleProblems, dump_rules, parse_rules, parse_seed
from minismtp.faults import MAX_RULES, FaultsConfig
from minismtp.values import Listener, Parser, PathProblems, got, host_name, suggest

# `limits` keys a listener may not set: key -> why (the check-config message says both).
# Every limit of the top-level section today bounds one session, so none is refused; a
# limit shared by sessions across listeners (per client, per worker) is added here.
TOP_LEVEL_ONLY_LIMITS: dict[str, str] = {
    "per_client": "a client's sessions are counted across every listener and worker",
}

_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}", re.ASCII)  # a log field, a metric label as is
_hostname = host_name()
_FAULT_KEYS = ("seed", "rules")


def _name(value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f'must be 1 to 64 letters, digits, "_", ".", ":" or "-", '
                         f"got {got(value)}")
    return value


def _limits(parsers: Callable[[], Mapping[str, Parser]]) -> Parser:
    """The `limits` mapping of a listener: each key through the top-level key's parser."""

    def parse(value: object) -> tuple[tuple[str, Any], ...]:
        if value is None:  # `limits:` with every key commented out: nothing overridden
            return ()
        if not isinstance(value, Mapping):
            raise ValueError(f"must be a mapping of limits (as the top-level limits "
                             f"section), got {got(value)}")
        known = parsers()
        fields: dict[str, Any] = {}
        problems: list[tuple[str, str]] = []
        for key, raw in value.items():
            key = str(key)
            if key in TOP_LEVEL_ONLY_LIMITS:
                problems.append((f".{key}", f"top-level only (limits.{key}): "
                                 f"{TOP_LEVEL_ONLY_LIMITS[key]}"))
            elif key not in known:
                allowed = [k for k in known if k not in TOP_LEVEL_ONLY_LIMITS]
                problems.append((f".{key}", f"unknown key{suggest(key, allowed)}"))
            else:
                try:
                    fields[key] = known[key](raw)
                except ValueError as exc:
                    problems.append((f".{key}", str(exc)))
        if problems:
            raise PathProblems(problems)
        return tuple((key, fields[key]) for key in known if key in fields)

    return parse


def _faults(value: object) -> tuple[tuple[str, Any], ...]:
    """A listener's `faults` mapping (seed, rules), each key as the top-level section
    reads it: the keys it gives, as (key, value) pairs; a key it leaves out, and every
    key for null or {}, is the top-level one (`effective_faults`)."""
    if value is None:  # `faults:` with every key commented out: nothing overridden
        return ()
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping (seed, rules) as the top-level faults "
                         f"section, got {got(value)}")
    problems: list[tuple[str, str]] = []
    for key in value:
        if str(key) not in _FAULT_KEYS:
            problems.append((f".{key}", f"unknown key{suggest(str(key), list(_FAULT_KEYS))}"))
    given: list[tuple[str, Any]] = []
    if "seed" in value:
        try:
            given.append(("seed", parse_seed(value["seed"])))
        except ValueError as exc:
            problems.append((".seed", str(exc)))
    if "rules" in value:
        try:
            given.append(("rules", parse_rules(value["rules"])))
        except RuleProblems as exc:
            problems.extend((f".rules{path}", message) for path, message in exc.items)
        except ValueError as exc:
            problems.append((".rules", str(exc)))
    if problems:
        raise PathProblems(problems)
    return tuple(given)


def listener_keys(limit_parsers: Callable[[], Mapping[str, Parser]]
                  ) -> dict[str, tuple[str, Parser]]:
    """The profile keys of a listener mapping, for `values.listen_list`; `limit_parsers`
    gives the top-level limits' parsers by key (config.SETTINGS), asked at parse time."""
    return {
        "name": ("name", _name),
        "hostname": ("hostname", _hostname),
        "limits": ("limits", _limits(limit_parsers)),
        "faults": ("faults", _faults),
    }


def resolve(listeners: tuple[Listener, ...], top_faults: FaultsConfig
            ) -> tuple[tuple[Listener, ...], list[tuple[str, str]]]:
    """Listeners whose fault rules are numbered after the top-level ones (their stats
    counters), and the problems between listeners: a name used twice, too many rules in
    all. Problems as (path below server.listen, message). A listener that did not parse
    is None, and stays None."""
    problems: list[tuple[str, str]] = []
    first: dict[str, int] = {}
    for index, listener in enumerate(listeners):
        if listener is None:  # not parsed (its problems are reported): none here
            continue
        seen = first.setdefault(listener.name, index)
        # Repeats of one port-0 address share their derived name (the address), each with
        # a socket and a profile of its own; a name given twice is a mistake.
        if seen != index and (listeners[seen].address != listener.address
                              or listener.name != str(listener.address)):
            problems.append((f"[{index}].name", f'duplicate name "{listener.name}" '
                             f"(also server.listen[{seen}])"))
    counted = len(top_faults.rules)
    resolved = []
    for index, listener in enumerate(listeners):
        if listener is not None and (own := own_rules(listener)):
            rules = tuple(replace(rule, index=counted + i) for i, rule in enumerate(own))
            counted += len(rules)
            if counted > MAX_RULES:
                problems.append((f"[{index}].faults.rules", f"at most {MAX_RULES} fault rules "
                                 "in all (faults.rules and every listener's together), got "
                                 f"{counted} so far"))
            faults = tuple((key, rules if key == "rules" else value)
                           for key, value in listener.faults)
            listener = replace(listener, faults=faults)
        resolved.append(listener)
    return tuple(resolved), problems


def own_rules(listener: Listener) -> tuple[Any, ...]:
    """The fault rules the listener gives itself (none if it inherits the top-level ones)."""
    return dict(listener.faults).get("rules", ())


def effective_faults(top: FaultsConfig, listener: Listener) -> FaultsConfig:
    """The top-level FaultsConfig with the keys the listener gives in its place."""
    return replace(top, **dict(listener.faults)) if listener.faults else top


def effective_limits(top: Any, listener: Listener | None) -> Any:
    """The top-level LimitsConfig with the listener's overrides applied."""
    if listener is None or not listener.limits:
        return top
    return replace(top, **dict(listener.limits))


def dump_profile(listener: Listener,
                 limit_dumpers: Mapping[str, Callable[[Any], object] | None]
                 ) -> dict[str, object]:
    """The profile keys of a listener mapping that `listener_keys` reads back to it."""
    entry: dict[str, object] = {}
    if listener.name != str(listener.address):
        entry["name"] = listener.name
    if listener.hostname is not None:
        entry["hostname"] = listener.hostname
    if listener.limits:
        entry["limits"] = {key: value if limit_dumpers.get(key) is None
                           else limit_dumpers[key](value) for key, value in listener.limits}
    if listener.faults:
        entry["faults"] = {key: dump_rules(value) if key == "rules" else value
                           for key, value in listener.faults}
    return entry
