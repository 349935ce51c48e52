"""The report: one table (scenario x server), the ratios to peers, and the targets.

Untrusted input: none.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from e2e import MIB
from e2e.scenarios import SCENARIO_BY_KEY
from e2e.servers import BY_NAME, SHORT


RATIO_LABELS = {"server_cpu_us_per_msg": "us/msg", "msgs_per_s": "msgs/s"}


def ratio_text(entry: dict[str, Any], by_key: dict[tuple[str, str], dict]) -> str:
    spec = BY_NAME[entry["server"]]
    scenario = SCENARIO_BY_KEY[entry["scenario"]]
    parts = []
    # Named figures (scenario.ratios) are labelled: "us/msg 1.04x mini, msgs/s 0.97x mini".
    for figure in scenario.ratios or (scenario.headline,):
        label = RATIO_LABELS[figure] + " " if scenario.ratios else ""
        mine = (entry.get("median") or {}).get(figure)
        for peer in spec.compare_to:
            other = by_key.get((entry["scenario"], peer))
            theirs = ((other or {}).get("median") or {}).get(figure)
            if other is None or other.get("status") != "ok" or entry.get("status") != "ok":
                continue
            if mine and theirs:
                ratio = mine / theirs
                parts.append(f"{label}{ratio:.2f}x {SHORT[peer]}" if ratio >= 0.1
                             else f"{label}{ratio:.3f}x {SHORT[peer]}")
    if parts and scenario.headline == "kib_per_conn":
        return "mem " + ", ".join(parts)
    return ", ".join(parts)


def per_cpu_text(entry: dict[str, Any]) -> str:
    """S1B: what one second of server CPU does, from the median CPU per message."""
    scenario = SCENARIO_BY_KEY[entry["scenario"]]
    us = (entry.get("median") or {}).get("server_cpu_us_per_msg")
    if not scenario.per_cpu or not us or entry.get("status") != "ok":
        return ""
    return f"{1e6 / us:,.0f} {scenario.per_cpu} per CPU-second"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(entries: list[dict[str, Any]]) -> str:
    by_key = {(e["scenario"], e["server"]): e for e in entries}
    header = ("scen", "server", "msgs/run", "msgs/s", "MB/s", "p50 ms", "p99 ms", "srv CPU s",
              "us/msg", "cli %", "RSS MiB", "KiB/conn", "ovfl", "vs peers / notes")
    rows = []
    for e in entries:
        m = e.get("median") or {}
        if e.get("status") == "skipped":
            rows.append((e["scenario"], e["server"], *["-"] * 11, "SKIPPED: " + e["reason"]))
            continue
        notes = ", ".join(filter(None, (per_cpu_text(e), ratio_text(e, by_key))))
        if e.get("status") != "ok":
            notes = "FAILED: " + "; ".join(e.get("notes") or [])[:160]
        else:
            if m.get("peak_connections"):
                notes += (("; " if notes else "") + f"held {m['peak_connections']:,} at once")
            if e.get("log_problem_count"):
                notes += (("; " if notes else "")
                          + f"{e['log_problem_count']} log lines flagged")
        if SCENARIO_BY_KEY[e["scenario"]].idle:
            if m.get("pss_kib_per_conn") is not None and e.get("status") == "ok":
                notes += (("; " if notes else "") + f"PSS {m['pss_kib_per_conn']:.2f} KiB/conn")
            rows.append((e["scenario"], e["server"], fmt(m.get("connections"), ",d"), "-", "-",
                         "-", "-", "-", "-", "-", fmt((m.get("peak_rss") or 0) / MIB, ".1f"),
                         fmt(m.get("kib_per_conn"), ".2f"),
                         fmt(m.get("listen_overflows"), "d"), notes))
            continue
        rss = m.get("peak_rss")
        rows.append((
            e["scenario"], e["server"], fmt(e.get("messages_per_run"), ",d"),
            fmt(m.get("msgs_per_s"), ",.0f"), fmt(m.get("mb_per_s"), ",.1f"),
            fmt(m.get("p50_ms"), ".2f"), fmt(m.get("p99_ms"), ".2f"),
            fmt(m.get("server_cpu_s"), ".2f"), fmt(m.get("server_cpu_us_per_msg"), ",.0f"),
            fmt(m.get("client_cpu_pct"), ".0f"), fmt(rss / MIB if rss else None, ".1f"), "-",
            fmt(m.get("listen_overflows"), "d"), notes))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    right = set(range(2, len(header) - 1))

    def line(row: tuple) -> str:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(header), rule]
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            out.append("")
        out.append(line(row))
        previous = row[0]
    return "\n".join(out)


class Target(NamedTuple):
    scenario: str
    server: str
    peer: str | None  # None: `bound` is absolute
    bound: float  # ratio to the peer, or absolute (MB/s, KiB/conn)
    label: str
    figure: str | None = None  # the median compared; None: the scenario's headline
    at_most: bool = False  # met when at or below the bound (else at or above)


TARGETS = tuple(Target(*target) for target in (
    # (scenario, server, peer or None, minimum ratio / absolute, label[, figure, at_most])
    ("S1", "minismtp-discard", "smtp-sink", 0.8, ">= 0.8x smtp-sink"),
    ("S1", "minismtp-discard", "aiosmtpd-discard", 4.0, ">= 4x aiosmtpd"),
    ("S2", "minismtp-discard", "smtp-sink", 0.5, ">= 0.5x smtp-sink"),
    ("S2", "minismtp-discard", "aiosmtpd-discard", 5.0, ">= 5x aiosmtpd"),
    ("S4", "minismtp-discard", "smtp-sink", 0.8, ">= 0.8x smtp-sink"),
    ("S3", "minismtp-discard", "smtp-sink", 3.0, ">= 3x smtp-sink (MB/s)"),
    ("S3", "minismtp-discard", None, 1000.0, "> 1 GB/s (1000 MB/s)"),
    ("S6", "minismtp-discard", None, 16.0, "<= 16 KiB per idle connection"),
    *((key, "minismtp-maildir-fsync", "aiosmtpd-maildir", 1.0,
       "fsync:true faster than aiosmtpd Maildir") for key in ("S1", "S2", "S4", "S5")),
    *((key, "minismtp-faults", "minismtp-discard", 0.95,
       "fault rules that never match cost < 5%") for key in ("S2", "S5")),
    ("S7", "minismtp-discard", "aiosmtpd-discard", 0.33,
     "server CPU per message <= 0.33x aiosmtpd", "server_cpu_us_per_msg", True),
    ("S7", "minismtp-discard", "aiosmtpd-discard", 2.0, ">= 2x aiosmtpd"),
    ("S8", "minismtp-discard", "bare-tls", 0.7, ">= 0.7x a bare Python TLS loop (MB/s)"),
    ("S8", "minismtp-discard", "aiosmtpd-discard", 5.0, ">= 5x aiosmtpd (MB/s)"),
    ("S9", "minismtp-discard", None, 32.0, "<= 32 KiB per idle TLS connection",
     "kib_per_conn", True),
    # The edge features against the same run without them, same client (S1E).
    *(target for server, what, bound in (
        ("minismtp-proxy", "PROXY v2", 0.05), ("minismtp-limits", "per-client limits", 0.05),
        ("minismtp-proxy-limits", "PROXY v2 and per-client limits", 0.05),
        ("minismtp-auth", "AUTH PLAIN (accept_any)", 0.10),
        ("minismtp-auth-pipelined", "AUTH PLAIN (accept_any) pipelined with MAIL", 0.10))
      for target in (
        ("S1E", server, "minismtp-discard", 1 + bound,
         f"{what}: server CPU per message <= {1 + bound:.2f}x without",
         "server_cpu_us_per_msg", True),
        ("S1E", server, "minismtp-discard", 1 - bound,
         f"{what}: >= {1 - bound:.2f}x the messages per second without"))),
))


def judge_targets(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(e["scenario"], e["server"]): e for e in entries}
    verdicts = []
    for scenario_key, server, peer, bound, label, figure, at_most in TARGETS:
        headline = figure or SCENARIO_BY_KEY[scenario_key].headline
        at_most = at_most or headline == "kib_per_conn"
        mine = by_key.get((scenario_key, server))
        if mine is None:
            continue
        value = (mine.get("median") or {}).get(headline) if mine.get("status") == "ok" else None
        verdict = {"scenario": scenario_key, "server": server, "target": label}
        if peer is not None:
            other = by_key.get((scenario_key, peer))
            theirs = (((other or {}).get("median") or {}).get(headline)
                      if (other or {}).get("status") == "ok" else None)
            if value is None or not theirs:
                verdict.update(result="not measured", value=None)
            else:
                ratio = value / theirs
                met = ratio <= bound if at_most else ratio >= bound
                verdict.update(value=round(ratio, 3), result="met" if met else "missed",
                               shown=f"{ratio:.2f}x")
        elif value is None:
            verdict.update(result="not measured", value=None)
        else:
            met = value <= bound if at_most else value > bound
            unit = "KiB/conn" if headline == "kib_per_conn" else "MB/s"
            verdict.update(value=round(value, 3), result="met" if met else "missed",
                           shown=f"{value:,.1f} {unit}")
        verdicts.append(verdict)
    return verdicts


def render_noise(entries: list[dict[str, Any]]) -> str:
    """Runs during which CPU went to something other than the server, client and harness."""
    busy = []
    for e in entries:
        foreign = (e.get("median") or {}).get("foreign_cpu_s")
        if foreign is None or foreign < 0.5:
            continue
        top: dict[str, float] = {}
        for run in e.get("runs") or []:
            for name, used in run.get("foreign_top") or []:
                top[name] = top.get(name, 0.0) + used / len(e["runs"])
        named = ", ".join(f"{name} {used:.1f}s" for name, used in
                          sorted(top.items(), key=lambda item: -item[1])[:2])
        busy.append(f"  {e['scenario']} {e['server']}: {foreign:.1f}s per run"
                    + (f" ({named})" if named else ""))
    if not busy:
        return ""
    return ("CPU used outside the server, the client and this harness during runs "
            "(other programs, kernel threads; figures beside it may be low):\n"
            + "\n".join(busy))


def render_report(meta: dict[str, Any], scenario_keys: list[str],
                  entries: list[dict[str, Any]], verdicts: list[dict[str, Any]]) -> str:
    probe = meta["filesystem"]
    journal = {True: ", journal", False: ", no journal", None: ""}[probe["journal"]]
    lines = [
        "",
        f"minismtp end-to-end benchmarks, {meta['date']}, {meta['cpus']} CPUs, "
        f"{meta['runs']} run(s) of ~{meta['target_seconds']:g}s each (median shown), "
        f"{meta['elapsed_s']:.0f}s total",
        ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"Maildirs on {probe['type']}{journal} ({meta['work_dir_setup']}): "
        f"create+write+link+unlink {probe['create_link_unlink_us']:.0f} us per file",
        *(f"  {key}: {SCENARIO_BY_KEY[key].title}" for key in scenario_keys),
        "",
        render_table(entries),
        "",
    ]
    if verdicts:
        lines.append("targets (minismtp):")
        lines += [f"  {v['scenario']} {v['server']}: {v['target']}: "
                  f"{v.get('shown', '-')} -> {v['result']}" for v in verdicts]
    noise = render_noise(entries)
    if noise:
        lines.append(noise)
    return "\n".join(lines)
