"""The statistics as they are shown: Prometheus text (`/metrics`), JSON (`/stats`, which
`minismtp stats` reads) and the master's run summary, from the `Totals` stats.py sums.

Untrusted input: none. Label values are configured names (fault rules, listeners),
escaped all the same, since the text format is strict.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from minismtp.stats import (
    HANDSHAKE_BOUNDS, HANDSHAKE_FAILURES, LATENCY_BOUNDS, PER_CLIENT_REASONS, PROXY_FAILURES,
    RuleName, Totals,
)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"


def _label(value: str) -> str:
    # Text format escapes: rule names are restricted already, but the format is strict.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _le(bound: float) -> str:
    return repr(bound)  # "0.0005", "1.0": shortest text that parses back to the bound


def _cumulative(buckets: Sequence[int]) -> list[int]:
    running, out = 0, []
    for count in buckets:
        running += count
        out.append(running)
    return out


def _fault_counts(totals: Totals, rule_names: Sequence[RuleName]
                  ) -> list[tuple[str | None, str, int]]:
    # Counters are kept by label; the rules configured now are shown, in their order, each
    # label once: listeners that share a name (repeats of a port-0 address) have a rule
    # each under one label, which holds the count of them all.
    faults = totals.faults
    return [(*((None, name) if isinstance(name, str) else name), faults.get(name, 0))
            for name in dict.fromkeys(rule_names)]


def render_prometheus(totals: Totals, rule_names: Sequence[RuleName]) -> str:
    """Totals in the Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []

    def family(name: str, kind: str, doc: str, samples: list[tuple[str, object]]) -> None:
        lines.extend((f"# HELP {name} {doc}", f"# TYPE {name} {kind}"))
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    family("minismtp_workers", "gauge", "Worker processes running.", [("", totals.workers)])
    family("minismtp_connections_open", "gauge", "Client connections open now.",
           [("", totals.connections_open)])
    family("minismtp_connections_total", "counter", "Client connections accepted.",
           [("", totals.connections_total)])
    family("minismtp_transactions_total", "counter", "MAIL commands accepted.",
           [("", totals.transactions)])
    family("minismtp_messages_accepted_total", "counter", "Messages accepted (250 after DATA).",
           [("", totals.messages_accepted)])
    family("minismtp_received_bytes_total", "counter", "Bytes received from clients.",
           [("", totals.bytes_received)])
    family("minismtp_rejections_total", "counter", "4xx and 5xx replies sent, by code.",
           [(f'{{code="{code}"}}', count) for code, count in sorted(totals.rejections.items())])
    family("minismtp_faults_injected_total", "counter",
           "Faults injected, by rule (and listener, for a listener's own rules).",
           [(f'{{rule="{_label(name)}"}}' if listener is None else
             f'{{listener="{_label(listener)}",rule="{_label(name)}"}}', count)
            for listener, name, count in _fault_counts(totals, rule_names)])
    family("minismtp_listener_sessions_total", "counter",
           "Client connections accepted, by listener (server.listen name).",
           [(f'{{listener="{_label(name)}"}}', counts[0])
            for name, counts in totals.listeners.items()])
    family("minismtp_listener_messages_accepted_total", "counter",
           "Messages accepted (250 after DATA), by listener.",
           [(f'{{listener="{_label(name)}"}}', counts[1])
            for name, counts in totals.listeners.items()])
    family("minismtp_tls_sessions_total", "counter", "TLS handshakes completed.",
           [("", totals.tls_sessions)])
    family("minismtp_tls_handshake_failures_total", "counter",
           "TLS handshakes that failed, by reason.",
           [(f'{{reason="{reason}"}}', count)
            for reason, count in zip(HANDSHAKE_FAILURES, totals.tls_failures)])
    family("minismtp_tls_plaintext_discarded_bytes_total", "counter",
           "Bytes a client sent after STARTTLS before the handshake, dropped unread.",
           [("", totals.tls_discarded_bytes)])
    family("minismtp_proxy_headers_total", "counter",
           "PROXY protocol headers accepted from a load balancer.",
           [("", totals.proxy_headers)])
    family("minismtp_proxy_failures_total", "counter",
           "Connections on PROXY protocol listeners closed before a header was had, "
           "by reason.",
           [(f'{{reason="{reason}"}}', count)
            for reason, count in zip(PROXY_FAILURES, totals.proxy_failures)])
    family("minismtp_auth_total", "counter",
           "AUTH attempts answered after their credentials reached the check, by "
           "result: success (235), failure (535), temporary (454: too many waiting, or "
           "the check itself failed). Not those a fault rule refused or dropped first "
           "(minismtp_faults_injected_total; a refusal also in "
           "minismtp_rejections_total), nor those the protocol refused (501, 503, 504, "
           "538).",
           [('{result="success"}', totals.auth_successes),
            ('{result="failure"}', totals.auth_failures),
            ('{result="temporary"}', totals.auth_temporary_failures)])

    family("minismtp_per_client_refused_total", "counter",
           "Sessions (421 4.7.0) and recipients (450 4.7.1) refused by the per-client "
           "limits (limits.per_client), by reason.",
           [(f'{{reason="{reason}"}}', count)
            for reason, count in zip(PER_CLIENT_REASONS, totals.per_client_refused)])
    family("minismtp_per_client_unchecked_total", "counter",
           "Sessions let through uncounted by the per-client limits: the client table "
           "had no room in the place of their address, or stayed locked too long.",
           [("", totals.per_client_unchecked)])

    def histogram(name: str, doc: str, bounds: tuple[float, ...], buckets: Sequence[int],
                  total: float) -> None:
        cumulative = _cumulative(buckets)
        lines.extend((f"# HELP {name} {doc}", f"# TYPE {name} histogram"))
        for bound, count in zip((*map(_le, bounds), "+Inf"), cumulative):
            lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
        lines.extend((f"{name}_sum {total!r}", f"{name}_count {cumulative[-1]}"))

    histogram("minismtp_end_of_data_seconds", "Time from the end-of-data marker to the reply.",
              LATENCY_BOUNDS, totals.latency_buckets, totals.latency_sum)
    histogram("minismtp_tls_handshake_seconds", "Time of completed TLS handshakes.",
              HANDSHAKE_BOUNDS, totals.handshake_buckets, totals.handshake_sum)
    return "\n".join(lines) + "\n"


def to_json(totals: Totals, rule_names: Sequence[RuleName]) -> dict[str, object]:
    """Totals as a JSON-ready dict; latency buckets are cumulative, as in Prometheus.
    A listener's own fault rules are counted under its entry of "listeners"."""
    cumulative = _cumulative(totals.latency_buckets)
    faults = _fault_counts(totals, rule_names)
    listeners: dict[str, dict[str, Any]] = {
        name: {"sessions": counts[0], "messages_accepted": counts[1], "faults": {}}
        for name, counts in totals.listeners.items()}
    for listener, name, count in faults:
        if listener is not None:
            listeners.setdefault(listener, {"sessions": 0, "messages_accepted": 0,
                                            "faults": {}})["faults"][name] = count
    return {
        "workers": totals.workers,
        "connections": {"open": totals.connections_open, "total": totals.connections_total},
        "transactions": totals.transactions,
        "messages_accepted": totals.messages_accepted,
        "bytes_received": totals.bytes_received,
        "rejections": {str(code): count for code, count in sorted(totals.rejections.items())},
        "faults": {name: count for listener, name, count in faults if listener is None},
        "listeners": listeners,
        "end_of_data_seconds": {
            "buckets": dict(zip((*map(_le, LATENCY_BOUNDS), "+Inf"), cumulative)),
            "sum": totals.latency_sum,
            "count": cumulative[-1],
        },
        "tls": {
            "sessions": totals.tls_sessions,
            "handshake_failures": dict(zip(HANDSHAKE_FAILURES, totals.tls_failures)),
            "plaintext_discarded_bytes": totals.tls_discarded_bytes,
            "handshake_seconds_sum": totals.handshake_sum,
        },
        "proxy": {
            "headers": totals.proxy_headers,
            "failures": dict(zip(PROXY_FAILURES, totals.proxy_failures)),
        },
        "per_client": {
            "refused": dict(zip(PER_CLIENT_REASONS, totals.per_client_refused)),
            "unchecked": totals.per_client_unchecked,
        },
        "auth": {
            "successes": totals.auth_successes,
            "failures": totals.auth_failures,
            "temporary_failures": totals.auth_temporary_failures,
        },
    }


def json_body(totals: Totals, rule_names: Sequence[RuleName]) -> bytes:
    return json.dumps(to_json(totals, rule_names), separators=(",", ":")).encode()


def summary_line(totals: Totals, elapsed_s: float) -> str:
    """The master's one-line account of a run, e.g. for its log on SIGTERM.

    MB are decimal (10**6 bytes), as in throughput figures.
    """
    rate = totals.messages_accepted / elapsed_s if elapsed_s > 0 else 0.0
    return (f"run summary: {totals.messages_accepted} messages accepted, "
            f"{totals.bytes_received / 1e6:.1f} MB received in {elapsed_s:.1f}s "
            f"({rate:.1f} msg/s)")
