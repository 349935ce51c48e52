"""End-to-end benchmarks: minismtp beside Postfix (smtp-sink, smtpd) and aiosmtpd, in one run.

    python bench/run.py [--scenarios S1,S2,...] [--servers NAME,...] [--runs 3] [--quick]
                        [--target-seconds 4] [--json out.json] [--baseline CHECKOUT]

Install the peers first with `bash bench/setup.sh`. See bench/README.md for what each
scenario measures and how to read the table. Everything runs on 127.0.0.1.

For each scenario: start each server on a free port, wait for its 220 greeting and run
one short warm-up (also used to size the measured runs: message count = rate x
--target-seconds, clamped to the scenario's bounds, so that every run lasts a few seconds
whatever the server's speed). Then the measured runs go round the servers, --runs rounds
(run 1 of each, run 2 of each, ..., each round starting one server further on), so that a
slow spell of the machine falls on every server alike; then the servers stop. S6 holds
10,000 connections and S9 1,000 TLS connections, one server at a time. The table shows the
median of each figure over the runs (peak RSS: the highest sample of any run).
Every run is checked: the client exits 0 having counted every message, and for Maildir
servers the files in new/ equal the messages sent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from e2e import IDLE_CONNECTIONS, ROOT, progress
from e2e.procfs import raise_nofile
from e2e.report import judge_targets, render_report
from e2e.scenarios import SCENARIO_BY_KEY, SCENARIOS, Contender, Scenario
from e2e.servers import BY_NAME, SERVERS, ServerSpec, add_baseline, find_program
from e2e.tlsfiles import make_certificate
from e2e.workdir import DEFERRED, ROOTS, filesystem_probe, make_root, remove_deferred


def commit_of(checkout: Path) -> str:
    """The checkout's commit, "+" if it has changes; "?" when git cannot tell."""
    try:
        out = subprocess.run(["git", "-C", str(checkout), "describe", "--always", "--dirty=+",
                              "--abbrev=10"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "?"


def versions(baseline: Path | None) -> dict[str, str]:
    found = {"python": platform.python_version(), "kernel": platform.release()}
    try:
        import aiosmtpd
        found["aiosmtpd"] = aiosmtpd.__version__
    except ImportError:
        pass
    try:
        sys.path.insert(0, str(ROOT))
        import minismtp
        found["minismtp"] = minismtp.__version__
    except ImportError:
        pass
    finally:
        sys.path.pop(0)
    found["commit"] = commit_of(ROOT)
    if baseline is not None:
        found["baseline"] = f"{baseline.resolve()} at {commit_of(baseline)}"
    postconf = find_program("postconf")
    if postconf:
        try:
            out = subprocess.run([postconf, "-d", "-h", "mail_version"], capture_output=True,
                                 text=True, timeout=10).stdout.strip()
            if out:
                found["postfix"] = out
        except (OSError, subprocess.SubprocessError):
            pass
    return found


def parse_list(text: str | None, known: dict[str, Any], what: str) -> list[str] | None:
    if not text:
        return None
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"run.py: unknown {what}: {', '.join(unknown)} "
                         f"(known: {', '.join(known)})")
    return names


def run_scenario(contenders: list[Contender], runs: int) -> list[dict[str, Any]]:
    """Warm up every server, then measure them round by round (see the docstring)."""
    if not contenders:  # every server of the scenario skipped (not installed)
        return []
    if contenders[0].scenario.idle:
        batches = [[contender] for contender in contenders]  # one at a time: memory
    else:
        batches = [contenders]
    entries = []
    for batch in batches:
        try:
            for contender in batch:
                contender.start()
            for round_index in range(runs):
                shift = round_index % len(batch)
                for contender in batch[shift:] + batch[:shift]:
                    contender.measure(round_index)
        finally:
            for contender in batch:
                entries.append(report_entry(contender.finish(), contender.label))
    return entries


def report_entry(entry: dict[str, Any], label: str) -> dict[str, Any]:
    if entry["status"] not in ("ok", "skipped"):
        progress(f"{label}: {entry['server']}: {entry['status'].upper()}: "
                 + "; ".join(entry.get("notes") or [entry.get("reason", "")])[:300]
                 + (f" (server logs kept in {entry['logs']})" if entry.get("logs") else ""))
    if entry.get("log_problem_count"):
        progress(f"{label}: {entry['server']}: {entry['log_problem_count']} flagged log "
                 f"line(s), e.g. {entry['log_problems'][0][:200]}")
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", help="comma-separated, e.g. S1,S3 (default: all)")
    parser.add_argument("--servers", help="comma-separated names (default: all; S6 by "
                        "default only the discard servers and smtp-sink)")
    parser.add_argument("--runs", type=int, help="measured runs per scenario and server "
                        "(default 3; 1 with --quick)")
    parser.add_argument("--target-seconds", type=float, help="length of each measured run, "
                        "by which the message count is sized (default 4; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="one short run each")
    parser.add_argument("--quiet-wait", type=float, metavar="SECONDS",
                        help="before each run, wait up to this long for other programs to "
                        "leave the CPUs idle (0: do not wait; default 30, 10 with --quick)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON here")
    parser.add_argument("--baseline", metavar="CHECKOUT", type=Path,
                        help="also run each chosen minismtp server from this other checkout "
                        "(rows NAME@baseline), e.g. a git worktree of the commit before a change")
    parser.add_argument("--work-dir", metavar="DIR", help="where server folders (Maildirs, "
                        "logs) are made (default: the temporary folder); removed at the end "
                        "except the logs of failed servers")
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.target_seconds = args.target_seconds or (1.0 if args.quick else 4.0)
    if args.quiet_wait is None:
        args.quiet_wait = 10.0 if args.quick else 30.0
    if args.runs < 1 or args.target_seconds <= 0:
        parser.error("--runs must be >= 1 and --target-seconds > 0")
    scenario_keys = parse_list(args.scenarios, SCENARIO_BY_KEY, "scenario") or [
        s.key for s in SCENARIOS]
    chosen_servers = parse_list(args.servers, BY_NAME, "server")

    nofile = raise_nofile()
    started = time.time()
    args.root, root_note = make_root(args.work_dir)
    ROOTS.append(args.root)
    probe = filesystem_probe(args.root)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "load_before": os.getloadavg(),
        "versions": versions(args.baseline),
        "runs": args.runs, "target_seconds": args.target_seconds, "quick": args.quick,
        "nofile_limit": nofile, "work_dir": str(args.root), "work_dir_setup": root_note,
        "filesystem": probe,
        "somaxconn": Path("/proc/sys/net/core/somaxconn").read_text().strip()
        if Path("/proc/sys/net/core/somaxconn").exists() else None,
    }
    plan: list[tuple[Scenario, ServerSpec]] = []
    for key in scenario_keys:
        scenario = SCENARIO_BY_KEY[key]
        names = chosen_servers or [s.name for s in SERVERS
                                   if (not scenario.only or s.name in scenario.only)
                                   and (not s.scenarios or scenario.key in s.scenarios)]
        if args.baseline is not None:
            names = add_baseline(names, args.baseline)
        plan += [(scenario, BY_NAME[name]) for name in names]
    progress(f"{len(plan)} scenario/server pairs, {args.runs} run(s) each, "
             f"~{args.target_seconds:g}s per run; logs of failed servers are kept")
    if nofile < IDLE_CONNECTIONS + 100 and "S6" in scenario_keys:
        progress(f"note: open-file limit {nofile} < {IDLE_CONNECTIONS + 100}: S6 may fail")

    if any(SCENARIO_BY_KEY[key].tls for key in scenario_keys):
        args.cert = make_certificate(args.root / "tls")  # ECDSA P-256, for every TLS server
        DEFERRED.append(args.root / "tls")
        progress(f"TLS certificate (ECDSA P-256): {args.cert.cert}")
    entries = []
    index = 0
    for key in scenario_keys:
        contenders = []
        for scenario, spec in [(sc, sp) for sc, sp in plan if sc.key == key]:
            index += 1
            label = f"{scenario.key} [{index}/{len(plan)}]"
            reason = spec.missing()
            if reason is None and scenario.client == "smtp-source" and not find_program(
                    "smtp-source"):
                reason = "smtp-source is not installed (bash bench/setup.sh installs postfix)"
            if reason is None and spec.scenarios and scenario.key not in spec.scenarios:
                reason = f"runs only in {', '.join(spec.scenarios)}"
            if reason:
                progress(f"{label}: skipping {spec.name}: {reason}")
                entries.append({"scenario": scenario.key, "server": spec.name,
                                "status": "skipped", "reason": reason})
                continue
            contenders.append(Contender(scenario, spec, args, label))
        entries += run_scenario(contenders, args.runs)

    verdicts = judge_targets(entries)
    meta["load_after"] = os.getloadavg()
    meta["elapsed_s"] = round(time.time() - started, 1)
    print(render_report(meta, scenario_keys, entries, verdicts))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"meta": meta, "results": entries, "targets": verdicts}, file,
                      indent=2, default=str)
        progress(f"wrote {args.json}")
    failed = [e for e in entries if e.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        remove_deferred()
