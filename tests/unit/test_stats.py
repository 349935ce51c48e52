"""Statistics: worker counters, the shared board, totals, and their three renderings."""

from __future__ import annotations

import json
import math
import os
import re
import struct

import pytest

from minismtp.stats import (
    LATENCY_BOUNDS, PROXY_FAILURES, Snapshot, StatsBoard, Totals, WorkerStats,
)
from minismtp.statsformat import render_prometheus, summary_line, to_json
from minismtp.values import MAX_LISTENERS

RULES = 4
NO_LISTENERS = (0,) * (2 * MAX_LISTENERS)
LISTENERS = ("mx", "chaos")  # names of busy_worker's listeners, by place
RULE_NAMES = ("busy-rcpt", "slow", ("chaos", "drop"), ("chaos", "late"))  # by index


def busy_worker(scale: int = 1, rules: int = RULES) -> WorkerStats:
    stats = WorkerStats(rules, len(LISTENERS))
    stats.listeners[0].sessions += 6 * scale
    stats.listeners[0].messages_accepted += 4 * scale
    stats.listeners[1].sessions += 4 * scale
    stats.listeners[1].messages_accepted += 3 * scale
    stats.connections_open += 2 * scale
    stats.connections_total += 10 * scale
    stats.transactions += 8 * scale
    stats.messages_accepted += 7 * scale
    stats.bytes_received += 1000 * scale
    stats.replies[450] += 3 * scale
    stats.replies[554] += scale
    stats.replies[250] += 99  # not a rejection: not published
    stats.faults[1] += 5 * scale
    for seconds in (0.0001, 0.0005, 0.003, 0.2, 10.0, 60.0):
        stats.observe_latency(seconds)
    stats.tls_sessions += 4 * scale
    stats.tls_discarded_bytes += 31 * scale
    stats.auth_successes += 6 * scale
    stats.auth_failures += 2 * scale
    stats.auth_temporary_failures += scale
    stats.observe_handshake(0.004)
    stats.count_handshake_failure("wrong version number")
    stats.count_handshake_failure("a reason nobody listed")
    stats.proxy_headers += 6 * scale
    stats.count_proxy_failure("untrusted source")
    stats.count_proxy_failure("bad v2 tlv")
    stats.count_per_client_refusal("sessions")
    stats.count_per_client_refusal("recipients")
    stats.count_per_client_refusal("recipients")
    stats.per_client_unchecked += 4 * scale
    return stats


def test_latency_buckets_follow_prometheus_le():
    stats = WorkerStats(0)
    for seconds in (0.0, 0.0005, 0.00051, 10.0, 10.5):
        stats.observe_latency(seconds)
    assert stats.latency_buckets[0] == 2  # <= 0.0005, the bound itself included
    assert stats.latency_buckets[1] == 1
    assert stats.latency_buckets[len(LATENCY_BOUNDS) - 1] == 1  # <= 10
    assert stats.latency_buckets[-1] == 1  # +Inf
    assert stats.latency_sum == pytest.approx(20.50101)


def test_publish_and_read_round_trip():
    board = StatsBoard(8, RULES)
    busy_worker().publish(board, 5)
    snapshot = board.read(5)
    assert snapshot == Snapshot(
        connections_open=2, connections_total=10, transactions=8, messages_accepted=7,
        bytes_received=1000, tls_sessions=4, tls_discarded_bytes=31,
        auth_successes=6, auth_failures=2, auth_temporary_failures=1,
        per_client_unchecked=4, latency_buckets=(2, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1),
        latency_sum=pytest.approx(70.2036),
        tls_failures=(0, 0, 0, 1, 0, 0, 0, 0, 1),
        handshake_buckets=(0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        handshake_sum=pytest.approx(0.004), proxy_headers=6,
        proxy_failures=tuple(int(reason in ("untrusted source", "bad v2 tlv"))
                             for reason in PROXY_FAILURES),
        per_client_refused=(1, 0, 2), rejections={450: 3, 554: 1}, faults=(0, 5, 0, 0),
        listeners=(6, 4, 4, 3, *NO_LISTENERS[4:]))
    assert board.read(4) == board.read(6) == Snapshot(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, (0,) * 15, 0.0, (0,) * 9, (0,) * 13, 0.0,
        (0,) * len(PROXY_FAILURES), (0, 0, 0), {}, (0,) * RULES, NO_LISTENERS)


def test_board_is_shared_across_fork():
    board = StatsBoard(2, RULES)
    pid = os.fork()
    if pid == 0:
        try:
            busy_worker(scale=3).publish(board, 1)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert board.read(1).messages_accepted == 21


def test_publish_with_fewer_rules_than_the_board_holds():
    board = StatsBoard(1, 8)
    busy_worker(rules=2).publish(board, 0)
    assert board.read(0).faults == (0, 5, 0, 0, 0, 0, 0, 0)


def test_publish_again_overwrites():
    board = StatsBoard(1, RULES)
    stats = busy_worker()
    stats.publish(board, 0)
    stats.messages_accepted += 100
    stats.connections_open -= 2
    stats.publish(board, 0)
    snapshot = board.read(0)
    assert (snapshot.messages_accepted, snapshot.connections_open) == (107, 0)


def test_totals_across_three_slots():
    board = StatsBoard(4, RULES)
    for slot, scale in ((0, 1), (1, 2), (3, 4)):
        busy_worker(scale).publish(board, slot)
    totals = board.totals([0, 1, 3], Totals(), rule_names=dict.fromkeys((0, 1, 3), RULE_NAMES))
    assert totals.workers == 3
    assert (totals.connections_open, totals.connections_total) == (14, 70)
    assert (totals.transactions, totals.messages_accepted, totals.bytes_received) \
        == (56, 49, 7000)
    assert totals.rejections == {450: 21, 554: 7}
    assert totals.faults == {"slow": 35}  # by label, nonzero only
    assert sum(totals.latency_buckets) == 18
    assert totals.latency_sum == pytest.approx(3 * 70.2036)
    assert (totals.tls_sessions, totals.tls_discarded_bytes) == (28, 217)
    assert (totals.auth_successes, totals.auth_failures,
            totals.auth_temporary_failures) == (42, 14, 7)
    assert totals.tls_failures == [0, 0, 0, 3, 0, 0, 0, 0, 3]
    assert sum(totals.handshake_buckets) == 3


def test_retired_workers_keep_totals_monotonic():
    board = StatsBoard(2, RULES)
    retired = Totals()
    busy_worker(scale=5).publish(board, 0)
    busy_worker(scale=1).publish(board, 1)
    names = dict.fromkeys((0, 1), RULE_NAMES)
    before = board.totals([0, 1], retired, rule_names=names)

    board.retire(0, retired, rule_names=RULE_NAMES)  # the worker in slot 0 exited, reaped
    assert board.read(0) == StatsBoard(1, RULES).read(0)  # cleared for the next worker
    after_exit = board.totals([1], retired, rule_names=names)
    busy_worker(scale=1).publish(board, 0)  # its replacement starts from zero
    after_restart = board.totals([0, 1], retired, rule_names=names)

    for later in (after_exit, after_restart):
        for name in ("connections_total", "transactions", "messages_accepted",
                     "bytes_received"):
            assert getattr(later, name) >= getattr(before, name), name
        assert sum(later.latency_buckets) >= sum(before.latency_buckets)
        assert later.rejections[450] >= before.rejections[450]
        assert later.faults["slow"] >= before.faults["slow"]
    assert after_exit.messages_accepted == before.messages_accepted
    assert after_restart.messages_accepted == before.messages_accepted + 7
    # Open connections describe the present: a gone worker holds none.
    assert (before.connections_open, after_exit.connections_open) == (12, 2)
    assert retired.connections_open == 0 and retired.workers == 0


def test_listener_totals_are_kept_by_name_across_a_reload():
    """A worker's slot counts its listeners by place; the master names them with that
    worker's configuration, so a reload that reorders or drops listeners mislabels
    nothing, and what a retired worker counted is kept."""
    board = StatsBoard(2, RULES)
    retired = Totals()
    busy_worker().publish(board, 0)  # the old generation: mx, chaos
    newer = WorkerStats(RULES, 2)  # the new one: chaos first, then a new listener
    newer.listeners[0].sessions += 100
    newer.listeners[1].messages_accepted += 1
    newer.publish(board, 1)
    names = {0: LISTENERS, 1: ("chaos", "submission")}
    assert board.totals([0, 1], retired, names).listeners == {
        "mx": [6, 4], "chaos": [104, 3], "submission": [0, 1]}
    board.retire(0, retired, LISTENERS)
    assert board.totals([1], retired, {1: names[1]}).listeners == {
        "mx": [6, 4], "chaos": [104, 3], "submission": [0, 1]}
    assert retired.listeners == {"mx": [6, 4], "chaos": [4, 3]}


def test_fault_totals_are_kept_by_label_across_a_reload():
    """A slot counts fault rules by index; the master labels them with that worker's
    configuration, so a reload that puts a listener's rule before another's neither
    relabels what the old workers counted nor loses it once they are gone."""
    board = StatsBoard(2, RULES)
    retired = Totals()
    busy_worker().publish(board, 0)  # the old generation: its rule 1 ("slow") fired 5 times
    newer = WorkerStats(RULES, 2)
    newer.faults[1] += 2  # the new one's rule 1 is another listener's
    newer.publish(board, 1)
    reordered = ("busy-rcpt", ("other", "first"), "slow", ("chaos", "drop"))
    names = {0: RULE_NAMES, 1: reordered}
    assert board.totals([0, 1], retired, rule_names=names).faults == {
        "slow": 5, ("other", "first"): 2}
    board.retire(0, retired, rule_names=RULE_NAMES)
    assert board.totals([1], retired, rule_names={1: reordered}).faults == {
        "slow": 5, ("other", "first"): 2}


def test_counts_of_more_listeners_than_the_board_holds_are_not_published():
    stats = WorkerStats(0, MAX_LISTENERS + 1)
    stats.listeners[-1].sessions += 1
    board = StatsBoard(1, 0)
    stats.publish(board, 0)
    assert board.read(0).listeners == NO_LISTENERS


def test_a_slot_left_mid_write_is_still_read():
    board = StatsBoard(1, RULES)
    busy_worker().publish(board, 0)
    board._map[0:8] = struct.pack("=Q", 101)  # odd sequence: a writer died mid-publish
    assert board.read(0).messages_accepted == 7  # bounded retries, then best effort
    board.clear(0)
    assert board.read(0).messages_accepted == 0


# --- Prometheus text format -----------------------------------------------------------

_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def parse_prometheus(text: str) -> dict[str, dict]:
    """A strict reading of text format 0.0.4: {family: {type, help, samples}}."""
    assert text.endswith("\n") and "\n\n" not in text
    families: dict[str, dict] = {}
    current = None
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("# HELP "):
            name, _, doc = line[7:].partition(" ")
            assert name not in families, f"family {name} twice"
            assert doc
            current = families[name] = {"help": doc, "type": None, "samples": []}
            continue
        if line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert current is families.get(name) and current["type"] is None
            assert not current["samples"], "TYPE after samples"
            assert kind in ("counter", "gauge", "histogram")
            current["type"] = kind
            continue
        assert not line.startswith("#"), line
        match = _SAMPLE.fullmatch(line)
        assert match, f"bad sample line {line!r}"
        name, _, label_text, value = match.groups()
        labels: dict[str, str] = {}
        rest = label_text or ""
        while rest:
            label = _LABEL.match(rest)
            assert label, f"bad labels in {line!r}"
            labels[label[1]] = label[2]
            rest = rest[label.end():]
        number = float(value)  # "+Inf", "1e-05" and plain numbers all parse
        assert current is not None and current["type"], f"sample before HELP/TYPE: {line}"
        family = next(f for f in families if name == f or name.startswith(f + "_"))
        assert families[family] is current, f"{name} outside its family"
        if current["type"] == "histogram":
            assert name[len(family):] in ("_bucket", "_sum", "_count")
        else:
            assert name == family
        if current["type"] == "counter":
            assert name.endswith("_total") and number >= 0
        current["samples"].append((name, labels, number))
    return families


def check_histogram(family: dict, name: str) -> tuple[list[float], float]:
    buckets = [(s[1]["le"], s[2]) for s in family["samples"] if s[0] == name + "_bucket"]
    [count] = [s[2] for s in family["samples"] if s[0] == name + "_count"]
    [total] = [s[2] for s in family["samples"] if s[0] == name + "_sum"]
    bounds = [float(le) for le, _ in buckets]
    counts = [n for _, n in buckets]
    assert bounds == sorted(bounds) and bounds[-1] == math.inf
    assert counts == sorted(counts), "buckets must be cumulative"
    assert counts[-1] == count
    return counts, total


def test_prometheus_output_parses_strictly():
    board = StatsBoard(3, RULES)
    for slot in range(3):
        busy_worker(slot + 1).publish(board, slot)
    shown = ("busy-rcpt", "slow.end", ("chaos", "x_y"))
    totals = board.totals([0, 1, 2], Totals(), dict.fromkeys(range(3), LISTENERS),
                          dict.fromkeys(range(3), shown))
    families = parse_prometheus(render_prometheus(totals, shown))
    assert {name: f["type"] for name, f in families.items()} == {
        "minismtp_workers": "gauge",
        "minismtp_connections_open": "gauge",
        "minismtp_connections_total": "counter",
        "minismtp_transactions_total": "counter",
        "minismtp_messages_accepted_total": "counter",
        "minismtp_received_bytes_total": "counter",
        "minismtp_rejections_total": "counter",
        "minismtp_faults_injected_total": "counter",
        "minismtp_listener_sessions_total": "counter",
        "minismtp_listener_messages_accepted_total": "counter",
        "minismtp_end_of_data_seconds": "histogram",
        "minismtp_tls_sessions_total": "counter",
        "minismtp_tls_handshake_failures_total": "counter",
        "minismtp_tls_plaintext_discarded_bytes_total": "counter",
        "minismtp_auth_total": "counter",
        "minismtp_tls_handshake_seconds": "histogram",
        "minismtp_proxy_headers_total": "counter",
        "minismtp_proxy_failures_total": "counter",
        "minismtp_per_client_refused_total": "counter",
        "minismtp_per_client_unchecked_total": "counter",
    }
    assert families["minismtp_workers"]["samples"] == [("minismtp_workers", {}, 3)]
    refused = {s[1]["reason"]: s[2]
               for s in families["minismtp_per_client_refused_total"]["samples"]}
    assert refused == {"sessions": 3, "new_sessions": 0, "recipients": 6}
    assert families["minismtp_per_client_unchecked_total"]["samples"][0][2] == 24
    assert families["minismtp_proxy_headers_total"]["samples"][0][2] == 36
    proxy_failures = {s[1]["reason"]: s[2]
                      for s in families["minismtp_proxy_failures_total"]["samples"]}
    assert proxy_failures["untrusted source"] == 3 and proxy_failures["timeout"] == 0
    assert families["minismtp_tls_sessions_total"]["samples"][0][2] == 24
    failures = {s[1]["reason"]: s[2]
                for s in families["minismtp_tls_handshake_failures_total"]["samples"]}
    assert failures["wrong version number"] == 3 and failures["other"] == 3
    assert sum(failures.values()) == 6
    auth = {s[1]["result"]: s[2] for s in families["minismtp_auth_total"]["samples"]}
    assert auth == {"success": 36, "failure": 12, "temporary": 6}
    counts, _ = check_histogram(families["minismtp_tls_handshake_seconds"],
                                "minismtp_tls_handshake_seconds")
    assert counts[-1] == 3
    assert families["minismtp_messages_accepted_total"]["samples"][0][2] == 42
    assert [(s[1], s[2]) for s in families["minismtp_rejections_total"]["samples"]] == [
        ({"code": "450"}, 18), ({"code": "554"}, 6)]
    assert [(s[1], s[2]) for s in families["minismtp_faults_injected_total"]["samples"]] == [
        ({"rule": "busy-rcpt"}, 0), ({"rule": "slow.end"}, 30),
        ({"listener": "chaos", "rule": "x_y"}, 0)]
    assert [(s[1], s[2]) for s in families["minismtp_listener_sessions_total"]["samples"]] \
        == [({"listener": "mx"}, 36), ({"listener": "chaos"}, 24)]
    assert [(s[1], s[2]) for s in
            families["minismtp_listener_messages_accepted_total"]["samples"]] \
        == [({"listener": "mx"}, 24), ({"listener": "chaos"}, 18)]
    counts, total = check_histogram(families["minismtp_end_of_data_seconds"],
                                     "minismtp_end_of_data_seconds")
    assert len(counts) == len(LATENCY_BOUNDS) + 1
    assert counts[-1] == 18 and total == pytest.approx(3 * 70.2036)


def test_prometheus_output_of_nothing_parses():
    families = parse_prometheus(render_prometheus(Totals(), []))
    assert families["minismtp_rejections_total"]["samples"] == []
    counts, total = check_histogram(families["minismtp_end_of_data_seconds"],
                                    "minismtp_end_of_data_seconds")
    assert counts == [0] * (len(LATENCY_BOUNDS) + 1) and total == 0


def test_label_values_are_escaped():
    totals = Totals(faults={'a"b\\c\nd': 1})
    families = parse_prometheus(render_prometheus(totals, ['a"b\\c\nd']))
    [sample] = families["minismtp_faults_injected_total"]["samples"]
    assert sample[1] == {"rule": 'a\\"b\\\\c\\nd'}


def test_listeners_sharing_a_name_show_each_of_its_rules_once():
    from minismtp.arbiter import rule_names
    from minismtp.config import load_config

    rule = {"rules": [{"stage": "rcpt", "reply": "450 4.2.0 busy"}]}
    config = load_config(overrides={"server.listen": [  # one derived name: "127.0.0.1:0"
        {"address": "127.0.0.1:0", "faults": rule}, {"address": "127.0.0.1:0", "faults": rule}]})
    names = rule_names(config)
    assert names == (("127.0.0.1:0", "rule0"),) * 2  # a counter each, by index
    board, stats = StatsBoard(1, RULES), WorkerStats(RULES)
    stats.faults[0] += 1
    stats.faults[1] += 2
    stats.publish(board, 0)
    totals = board.totals([0], Totals(), rule_names={0: names})
    families = parse_prometheus(render_prometheus(totals, names))
    assert families["minismtp_faults_injected_total"]["samples"] == [
        ("minismtp_faults_injected_total", {"listener": "127.0.0.1:0", "rule": "rule0"}, 3.0)]
    assert to_json(totals, names)["listeners"]["127.0.0.1:0"]["faults"] == {"rule0": 3}


# --- JSON and the summary line --------------------------------------------------------


def test_json_shape():
    board = StatsBoard(1, RULES)
    busy_worker().publish(board, 0)
    document = to_json(board.totals([0], Totals(), {0: LISTENERS}, {0: RULE_NAMES}),
                       RULE_NAMES)
    assert json.loads(json.dumps(document)) == document
    latency = document.pop("end_of_data_seconds")
    assert document == {
        "workers": 1,
        "connections": {"open": 2, "total": 10},
        "transactions": 8,
        "messages_accepted": 7,
        "bytes_received": 1000,
        "rejections": {"450": 3, "554": 1},
        "faults": {"busy-rcpt": 0, "slow": 5},
        "listeners": {
            "mx": {"sessions": 6, "messages_accepted": 4, "faults": {}},
            "chaos": {"sessions": 4, "messages_accepted": 3,
                      "faults": {"drop": 0, "late": 0}},
        },
        "tls": {
            "sessions": 4,
            "handshake_failures": {
                "timeout": 0, "unexpected eof": 0, "connection reset": 0,
                "wrong version number": 1, "http request": 0, "unsupported protocol": 0,
                "no shared cipher": 0, "stopping": 0, "other": 1},
            "plaintext_discarded_bytes": 31,
            "handshake_seconds_sum": pytest.approx(0.004),
        },
        "proxy": {
            "headers": 6,
            "failures": {reason: int(reason in ("untrusted source", "bad v2 tlv"))
                         for reason in PROXY_FAILURES},
        },
        "per_client": {"refused": {"sessions": 1, "new_sessions": 0, "recipients": 2},
                       "unchecked": 4},
        "auth": {"successes": 6, "failures": 2, "temporary_failures": 1},
    }
    assert list(latency["buckets"]) == [repr(b) for b in LATENCY_BOUNDS] + ["+Inf"]
    assert list(latency["buckets"].values()) == [2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 5, 6]
    assert latency["count"] == 6 and latency["sum"] == pytest.approx(70.2036)


@pytest.mark.parametrize(("messages", "nbytes", "elapsed", "expected"), [
    (12345, 12_300_000, 61.0,
     "run summary: 12345 messages accepted, 12.3 MB received in 61.0s (202.4 msg/s)"),
    (0, 0, 0.0, "run summary: 0 messages accepted, 0.0 MB received in 0.0s (0.0 msg/s)"),
    (1, 512, 0.25, "run summary: 1 messages accepted, 0.0 MB received in 0.2s (4.0 msg/s)"),
])
def test_summary_line(messages, nbytes, elapsed, expected):
    assert summary_line(Totals(messages_accepted=messages, bytes_received=nbytes),
                        elapsed) == expected
