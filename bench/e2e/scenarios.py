"""Scenarios S1..S9, S1E and S1B, and how one scenario is run and measured against one server.

Untrusted input: none beyond the clients' results (see clients.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from e2e import IDLE_CONNECTIONS, KIB, MIB, progress
from e2e.clients import (ClientResult, hold_idle, hold_idle_tls, pipeline_client,
                         session_client, smtp_source, tls_client)
from e2e.edge import BENCH_PASSWORD, BENCH_USER
from e2e.procfs import (TICK, RssSampler, all_process_ticks, cpu_ticks, describe_process,
                        listen_counters, machine_busy_ticks, tree_pss, tree_rss, wait_for_quiet)
from e2e.servers import Server, ServerSpec
from e2e.workdir import DEFERRED


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    size: int  # message payload bytes (0: no messages)
    sessions: int
    warmup: int  # warm-up messages; its rate sizes the measured runs
    bounds: tuple[int, int]  # measured messages per run: (min, max)
    client: str  # "smtp-source", "pipeline", "session", "tls", "idle" or "tls-idle"
    keep_open: bool = False
    tls: str = ""  # "starttls" or "implicit": how the servers' listeners speak TLS
    per_connection: bool = False  # "tls": a connection (full handshake) per message
    line_length: int = 76  # "tls": characters per body line
    headline: str = "msgs_per_s"  # the figure ratios are taken on
    only: tuple[str, ...] = ()  # default servers, when not all
    ratios: tuple[str, ...] = ()  # figures compared to peers, named (default: headline)
    per_cpu: str = ""  # noted per row: what one second of server CPU does ("AUTHs")

    @property
    def idle(self) -> bool:
        return self.client in ("idle", "tls-idle")

    def run(self, server: Server, messages: int) -> ClientResult:
        if self.client == "tls":
            mode = "bare" if server.spec.kind == "bare-tls" else self.tls
            return tls_client(server.port, mode=mode, sessions=self.sessions, size=self.size,
                              messages=messages, line_length=self.line_length,
                              per_connection=self.per_connection)
        if self.client == "session":  # what the server's listener needs, nothing more
            spec = server.spec
            return session_client(server.port, sessions=self.sessions, size=self.size,
                                  messages=messages, proxy=spec.proxy,
                                  credentials=(BENCH_USER, BENCH_PASSWORD) if spec.auth
                                  else None, noop=spec.client_noop,
                                  pipeline_auth=spec.client_pipelines_auth)
        if self.client == "pipeline":
            return pipeline_client(server.port, sessions=self.sessions, size=self.size,
                                   messages=messages)
        return smtp_source(server.port, sessions=min(self.sessions, messages),
                           size=self.size, messages=messages, keep_open=self.keep_open)


IDLE_TLS_CONNECTIONS = 1000  # S9
TLS_PEERS = ("minismtp-discard", "aiosmtpd-discard", "postfix-tls")

EDGE = ("minismtp-discard", "minismtp-proxy", "minismtp-noop", "minismtp-auth",
        "minismtp-auth-pipelined", "minismtp-limits", "minismtp-proxy-limits")  # S1E
CPU_AND_RATE = ("server_cpu_us_per_msg", "msgs_per_s")

SCENARIOS = (
    Scenario("S1", "1 KiB, one message per connection, 20 sessions", KIB, 20, 1000,
             (2000, 200_000), "smtp-source"),
    Scenario("S2", "1 KiB, connections kept open (-d), 20 sessions", KIB, 20, 2000,
             (2000, 400_000), "smtp-source", keep_open=True),
    Scenario("S3", "10 MiB messages, one session", 10 * MIB, 1, 2, (3, 400), "smtp-source",
             headline="mb_per_s"),
    Scenario("S4", "1 KiB, 1,000 connections at once", KIB, 1000, 2000, (3000, 200_000),
             "smtp-source"),
    Scenario("S5", "1 KiB, pipelined (EHLO, MAIL+RCPT+DATA, body+next), 20 sessions", KIB,
             20, 2000, (2000, 400_000), "pipeline"),
    Scenario("S1E", "1 KiB, one message per connection, 20 sessions, bench/session_client.py "
             "(EHLO; a PROXY v2 header, AUTH PLAIN where the listener takes them)", KIB, 20,
             1000, (2000, 200_000), "session", only=EDGE, ratios=CPU_AND_RATE),
    Scenario("S1B", "S1E's client, 8 sessions, AUTH PLAIN on every connection, passwords "
             "checked against bcrypt hashes", KIB, 8, 16, (20, 20_000), "session",
             only=("minismtp-auth", "minismtp-bcrypt12", "minismtp-bcrypt5"),
             ratios=CPU_AND_RATE, per_cpu="AUTHs"),
    Scenario("S6", f"memory with {IDLE_CONNECTIONS:,} idle connections", 0,
             IDLE_CONNECTIONS, 0, (0, 0), "idle", headline="kib_per_conn",
             only=("smtp-sink", "aiosmtpd-discard", "minismtp-discard")),
    Scenario("S7", "1 KiB, one message per connection, STARTTLS on each (full handshake), "
             "20 sessions", KIB, 20, 400, (500, 100_000), "tls", tls="starttls",
             per_connection=True, only=TLS_PEERS),
    Scenario("S8", "10 MiB messages over implicit TLS, 998-character lines, one session",
             10 * MIB, 1, 2, (3, 400), "tls", tls="implicit", line_length=998,
             headline="mb_per_s", only=(*TLS_PEERS, "bare-tls")),
    Scenario("S9", f"memory with {IDLE_TLS_CONNECTIONS:,} idle TLS connections (after "
             "STARTTLS)", 0, IDLE_TLS_CONNECTIONS, 0, (0, 0), "tls-idle", tls="starttls",
             headline="kib_per_conn", only=TLS_PEERS),
)
SCENARIO_BY_KEY = {scenario.key: scenario for scenario in SCENARIOS}


def nice_count(value: float, low: int, high: int) -> int:
    """Clamp to bounds and round to two significant digits (stable across runs)."""
    value = max(low, min(high, value))
    digits = max(0, int(math.floor(math.log10(value))) - 1) if value >= 1 else 0
    return int(max(low, min(high, round(value, -digits))))


class Measurement:
    """Server CPU, RSS peak, machine CPU and listen-queue counters around one client run."""

    def __init__(self, server: Server, count_connections: bool = False) -> None:
        self.server = server
        self.count_connections = count_connections

    def __enter__(self) -> Measurement:
        self.pids_before = self.server.tree()
        self.cpu_before = cpu_ticks(self.pids_before)
        self.listen_before = listen_counters()
        self.busy_before = machine_busy_ticks()
        self.self_before = resource.getrusage(resource.RUSAGE_SELF)
        self.all_before = all_process_ticks()
        self.sampler = RssSampler(self.server.proc.pid,
                                  count_sockets=self.count_connections).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sampler.__exit__()
        all_after = all_process_ticks()
        pids_after = self.server.tree()
        cpu_after = cpu_ticks(pids_after)
        self.server_cpu = sum(ticks - self.cpu_before.get(pid, 0)
                              for pid, ticks in cpu_after.items()) / TICK
        self.lost = sorted(set(self.pids_before) - set(pids_after))  # their CPU is lost
        self.new = sorted(set(pids_after) - set(self.pids_before))
        after = listen_counters()
        self.overflows = {key: after[key] - self.listen_before.get(key, 0) for key in after}
        self.busy = (machine_busy_ticks() - self.busy_before) / TICK
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.harness_cpu = (usage.ru_utime - self.self_before.ru_utime
                            + usage.ru_stime - self.self_before.ru_stime)
        self.peak_rss = self.sampler.peak
        # Who else used the CPUs meanwhile (processes alive at the end; the client is gone).
        ours = set(self.pids_before) | set(pids_after) | {os.getpid()}
        others = sorted(((ticks - self.all_before.get(pid, 0), pid)
                         for pid, ticks in all_after.items() if pid not in ours),
                        reverse=True)
        self.foreign_top = [(describe_process(pid), used / TICK)
                            for used, pid in others[:3] if used / TICK >= 0.05]


def one_run(scenario: Scenario, server: Server, messages: int,
            quiet_wait: float = 0.0) -> dict[str, Any]:
    # The server is idle here, so what the machine is busy with is someone else's work.
    busy = wait_for_quiet(quiet_wait) if quiet_wait > 0 else None
    stored_before = server.maildir_count()[0] if server.spec.backend == "maildir" else 0
    with Measurement(server, count_connections=scenario.sessions >= 100) as measured:
        result = scenario.run(server, messages)
    notes = []
    if not result.ok:
        notes.append(result.detail)
    elif result.detail:
        notes.append(result.detail)
    if server.spec.backend == "maildir":
        stored, leftover = server.maildir_count()
        if stored - stored_before != result.messages:
            notes.append(f"Maildir got {stored - stored_before} files in new/ for "
                         f"{result.messages} messages")
            result.ok = False
        if leftover:
            notes.append(f"{leftover} files left in tmp/")
        if scenario.size >= MIB:
            # Few, large files: removed now to bound the disk used. Small ones stay until
            # the end of the benchmark (see DEFERRED): on ext4 without a journal, inodes
            # freed in the last minutes are skipped when allocating, so deleting thousands
            # of files here would slow every file the next runs create.
            server.clear_maildir()
    if not server.alive():
        notes.append(f"server died (status {server.proc.returncode}): {server.log_tail()}")
        result.ok = False
    if measured.lost or measured.new:
        notes.append(f"server processes changed during the run: gone {measured.lost}, "
                     f"new {measured.new}")
    # CPU used on the machine by anything but this server, this client and this harness:
    # other work competing for the 2 cores makes the figures lower than they should be.
    foreign = measured.busy - measured.server_cpu - result.client_cpu - measured.harness_cpu
    seconds = result.seconds
    return {
        "ok": result.ok,
        "messages": result.messages,
        "requested": messages,
        "seconds": seconds,
        "msgs_per_s": result.messages / seconds if seconds > 0 else 0.0,
        "mb_per_s": result.messages * scenario.size / seconds / 1e6 if seconds > 0 else 0.0,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "server_cpu_s": measured.server_cpu,
        "server_cpu_us_per_msg": (measured.server_cpu / result.messages * 1e6
                                  if result.messages else None),
        "client_cpu_s": result.client_cpu,
        "client_cpu_pct": 100 * result.client_cpu / seconds if seconds > 0 else None,
        "foreign_cpu_s": max(0.0, foreign),
        "peak_rss": measured.peak_rss,
        "listen_overflows": measured.overflows.get("ListenOverflows", 0),
        "listen_drops": measured.overflows.get("ListenDrops", 0),
        "busy_cores_before": busy,
        "foreign_top": measured.foreign_top,
        "peak_connections": measured.sampler.peak_connections or None,
        "tls": result.tls or None,
        "handshakes": result.handshakes or None,
        "notes": notes,
    }


def idle_run(scenario: Scenario, server: Server) -> dict[str, Any]:
    time.sleep(0.5)  # let the start-up settle
    before = tree_rss(server.proc.pid)
    pss_before = tree_pss(server.proc.pid)
    listen_before = listen_counters()
    started = time.perf_counter()
    count = scenario.sessions
    if scenario.client == "tls-idle":
        socks, failures, note = hold_idle_tls(server.port, count)
    else:
        socks, failures, note = hold_idle(server.port, count)
    opened = time.perf_counter() - started
    try:
        time.sleep(1.0)  # let the server finish the greetings' bookkeeping
        with_conns = max(tree_rss(server.proc.pid) for _ in range(3))
        pss_with = tree_pss(server.proc.pid)
        alive_all = server.alive()
    finally:
        for sock in socks:
            sock.close()
    listen_after = listen_counters()
    held = len(socks)
    notes = [note] if note else []
    if not alive_all:
        notes.append(f"server died (status {server.proc.returncode}): {server.log_tail()}")
    per_conn = (with_conns - before) / held if held else None
    pss_per_conn = (pss_with - pss_before) / held if held else None
    return {
        "ok": held == count and alive_all,
        "connections": held,
        "failures": failures,
        "seconds_to_open": opened,
        "rss_idle_before": before,
        "rss_with_connections": with_conns,
        "peak_rss": with_conns,
        "kib_per_conn": per_conn / KIB if per_conn is not None else None,
        "pss_kib_per_conn": pss_per_conn / KIB if pss_per_conn is not None else None,
        "listen_overflows": (listen_after.get("ListenOverflows", 0)
                             - listen_before.get("ListenOverflows", 0)),
        "listen_drops": (listen_after.get("ListenDrops", 0)
                         - listen_before.get("ListenDrops", 0)),
        "notes": notes,
    }


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


class Contender:
    """One server in one scenario: started and warmed up, then measured round by round.

    The runs of all the servers of a scenario are interleaved (run 1 of each, then run 2
    of each, ...), so a slow spell of this shared machine falls on all of them alike
    instead of on whichever server happened to run in it.
    """

    def __init__(self, scenario: Scenario, spec: ServerSpec, args: argparse.Namespace,
                 label: str) -> None:
        self.scenario, self.spec, self.args, self.label = scenario, spec, args, label
        self.entry: dict[str, Any] = {"scenario": scenario.key, "server": spec.name,
                                      "runs": []}
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{scenario.key}-{spec.name}-",
                                             dir=args.root))
        self.entry["logs"] = str(self.workdir)
        self.server = Server(spec, self.workdir, connections=scenario.sessions,
                             tls=scenario.tls, cert=getattr(args, "cert", None))
        self.count = 0
        self.done = False  # finished early: failed, or nothing to run

    def start(self) -> None:
        """Start the server and warm it up, which sizes the measured runs."""
        scenario, spec, args, entry = self.scenario, self.spec, self.args, self.entry
        try:
            progress(f"{self.label}: starting {spec.name}")
            self.server.start()
            entry["port"] = self.server.port
            if scenario.idle:
                self._idle()
                return
            # --quick: half the warm-up and half the least count (slow servers set the pace).
            warm = max(1, scenario.warmup // 2) if args.quick else scenario.warmup
            progress(f"{self.label}: {spec.name} warm-up, {warm:,} messages")
            warmup = one_run(scenario, self.server, warm, args.quiet_wait)
            entry["warmup"] = warmup
            if not warmup["ok"]:
                self._fail("warm-up failed: " + "; ".join(warmup["notes"]))
                return
            low, high = scenario.bounds
            low = max(2, low // 2) if args.quick else low
            self.count = nice_count(warmup["msgs_per_s"] * args.target_seconds, low, high)
            entry["messages_per_run"] = self.count
        except Exception as exc:  # one server's failure must not end the whole run
            self._fail(f"{type(exc).__name__}: {exc}")

    def measure(self, index: int) -> None:
        """Measured run number `index` (from 0)."""
        if self.done:
            return
        try:
            warm_rate = max(self.entry["warmup"]["msgs_per_s"], 1e-9)
            progress(f"{self.label}: {self.spec.name} run {index + 1}/{self.args.runs}, "
                     f"{self.count:,} messages (~{self.count / warm_rate:.1f}s at warm-up "
                     "rate)")
            run = one_run(self.scenario, self.server, self.count, self.args.quiet_wait)
            self.entry["runs"].append(run)
            if not run["ok"]:
                self.done = True
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")

    def finish(self) -> dict[str, Any]:
        """Stop the server; the entry with the medians of the runs."""
        entry = self.entry
        try:
            if "status" not in entry:
                self._summarise()
        finally:
            server = self.server
            server.stop()
            problems = server.log_problems()
            if problems:
                entry["log_problems"] = problems[:20]
                entry["log_problem_count"] = len(problems)
            if entry.get("status") == "ok" and not problems:
                DEFERRED.append(self.workdir)  # Maildir and logs, removed at the very end
                entry.pop("logs", None)
            else:
                DEFERRED.append(server.maildir)  # keep the logs of a failure
        return entry

    def _fail(self, note: str) -> None:
        self.entry["status"] = "failed"
        self.entry["notes"] = [note]
        self.done = True

    def _idle(self) -> None:
        entry = self.entry
        count = self.scenario.sessions
        progress(f"{self.label}: opening {count:,} idle "
                 f"{'TLS ' if self.scenario.tls else ''}connections")
        if self.args.quiet_wait > 0:
            wait_for_quiet(self.args.quiet_wait)
        run = idle_run(self.scenario, self.server)
        entry["runs"].append(run)
        entry["status"] = "ok" if run["ok"] else "skipped"
        if not run["ok"]:  # a peer that cannot hold them all is skipped, and says why
            entry["reason"] = (f"cannot hold {count:,} idle connections: "
                               + "; ".join(run["notes"]))
        entry["median"] = {key: run[key] for key in
                           ("kib_per_conn", "pss_kib_per_conn", "peak_rss", "rss_idle_before",
                            "rss_with_connections", "connections")}
        entry["median"]["listen_overflows"] = run["listen_overflows"]
        entry["notes"] = run["notes"]
        self.done = True

    def _summarise(self) -> None:
        entry = self.entry
        runs = entry["runs"]
        good = [run for run in runs if run["ok"]]
        entry["status"] = "ok" if len(good) == self.args.runs else "failed"
        if not runs:
            entry["notes"] = ["no measured run"]
            return
        entry["median"] = {key: median_of(good or runs, key) for key in
                           ("msgs_per_s", "mb_per_s", "p50_ms", "p99_ms", "server_cpu_s",
                            "server_cpu_us_per_msg", "client_cpu_pct", "foreign_cpu_s")}
        entry["median"]["peak_rss"] = max(run["peak_rss"] for run in runs)
        entry["median"]["listen_overflows"] = sum(run["listen_overflows"] for run in runs)
        if any(run.get("peak_connections") for run in runs):
            entry["median"]["peak_connections"] = max(run["peak_connections"] or 0
                                                      for run in runs)
        entry["notes"] = [note for run in runs for note in run["notes"]]
        tls = sorted({run["tls"] for run in runs if run.get("tls")})
        if tls:
            entry["median"]["tls"] = ", ".join(tls)
