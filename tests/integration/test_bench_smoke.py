"""bench/run.py end to end, smallest size: one scenario, real minismtp servers, 127.0.0.1.

These check that the harness works (starts the server, drives a client, reads /proc,
writes its table and JSON), never how fast anything is: only that a rate was measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 120.0

# S5's client is bench/pipeline_client.py (Python), so no Postfix tools are needed.
SMALLEST = ["--scenarios", "S5", "--servers", "minismtp-discard", "--quick", "--runs", "1",
            "--target-seconds", "0.05", "--quiet-wait", "0"]


def run_bench(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "e2e.json"
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), *SMALLEST, "--work-dir", str(work),
         "--json", str(out), *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert out.exists(), done.stderr[-2000:]
    return done, json.loads(out.read_text())


def rows(stdout: str, scenario: str) -> dict[str, str]:
    """Table rows of one scenario by server name."""
    found = {}
    for line in stdout.splitlines():
        cells = line.split()
        if len(cells) > 2 and cells[0] == scenario:
            found[cells[1]] = line
    return found


def test_one_scenario_runs_end_to_end_and_measures_a_rate(tmp_path):
    done, report = run_bench(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    [entry] = report["results"]
    assert (entry["scenario"], entry["server"], entry["status"]) == ("S5", "minismtp-discard", "ok")
    assert len(entry["runs"]) == 1 and entry["runs"][0]["ok"]
    assert entry["messages_per_run"] > 0
    assert entry["median"]["msgs_per_s"] > 0
    assert entry["median"]["server_cpu_s"] > 0
    assert list(rows(done.stdout, "S5")) == ["minismtp-discard"]


def test_baseline_rows_run_the_other_checkout(tmp_path):
    # A checkout whose minismtp exits at once with status 3: its row can only fail that
    # way if the server really was started from there.
    other = tmp_path / "other"
    (other / "minismtp").mkdir(parents=True)
    (other / "minismtp" / "__init__.py").write_text("")
    (other / "minismtp" / "__main__.py").write_text("raise SystemExit(3)\n")

    done, report = run_bench(tmp_path, "--baseline", str(other))
    assert done.returncode == 1  # a server failed
    by_server = {entry["server"]: entry for entry in report["results"]}
    assert list(by_server) == ["minismtp-discard", "minismtp-discard@baseline"]
    assert by_server["minismtp-discard"]["status"] == "ok"
    assert by_server["minismtp-discard"]["median"]["msgs_per_s"] > 0
    failed = by_server["minismtp-discard@baseline"]
    assert failed["status"] == "failed"
    assert "minismtp-discard@baseline exited with status 3" in failed["notes"][0]
    assert report["meta"]["versions"]["baseline"] == f"{other.resolve()} at ?"
    assert "FAILED: RuntimeError: minismtp-discard@baseline exited with status 3" in \
        rows(done.stdout, "S5")["minismtp-discard@baseline"]


def test_tls_scenarios_run_end_to_end(tmp_path):
    # S7 (STARTTLS, a handshake per message) and S8 (implicit TLS, 10 MiB) against minismtp,
    # and S8's bare TLS loop; the Python TLS client, so again no Postfix tools are needed.
    done, report = run_bench(tmp_path, "--scenarios", "S7,S8",
                             "--servers", "minismtp-discard,bare-tls")
    assert done.returncode == 0, done.stderr[-2000:]
    by_key = {(e["scenario"], e["server"]): e for e in report["results"]}
    assert by_key[("S7", "bare-tls")]["status"] == "skipped"  # it speaks no SMTP
    for key in (("S7", "minismtp-discard"), ("S8", "minismtp-discard"), ("S8", "bare-tls")):
        entry = by_key[key]
        assert entry["status"] == "ok", entry
        [run] = entry["runs"]
        assert run["ok"] and run["messages"] == run["requested"] == entry["messages_per_run"]
        assert run["tls"].startswith("TLSv1.")
    s7 = by_key[("S7", "minismtp-discard")]["runs"][0]
    assert s7["handshakes"] == s7["messages"]  # a full handshake per message
    assert by_key[("S8", "minismtp-discard")]["runs"][0]["handshakes"] == 1
    assert "0.7x a bare Python TLS loop" in done.stdout


def test_in_process_tools_still_drive_a_real_worker(tmp_path: Path) -> None:
    """bench/worker_python.py (scripted sockets) and bench/profile_worker.py (a real
    worker under cProfile) build a Worker themselves: they break when its set-up changes."""
    python = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "worker_python.py"), "--messages", "200",
         "--repeat", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert python.returncode == 0, python.stderr[-2000:]
    assert "S1 shape:" in python.stdout and "S2 shape:" in python.stdout
    profiled = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "profile_worker.py"), "S5", "--messages", "300",
         "--top", "3"], cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert profiled.returncode == 0, profiled.stderr[-2000:] + profiled.stdout[-2000:]
    assert "300 delivered" in profiled.stdout


def test_every_s1e_edge_of_the_in_process_worker_delivers_bare(tmp_path: Path) -> None:
    """What bench/instructions.py runs under callgrind: each edge's listener and client
    agree (a PROXY edge fails without its header, AUTH without its credentials), the
    limits edges have a table to count in (flushed as instructions.py has it), and
    --no-profile prints no profile but the worker's CPU per message (bench/edge_cpu.py)."""
    for edge in ("none", "proxy", "noop", "auth", "auth-pipelined", "limits", "proxy-limits"):
        bare = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "profile_worker.py"), "S1E", "--edge", edge,
             "--messages", "200", "--no-profile", "--flush-s", "0.5"],
            cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert bare.returncode == 0, (edge, bare.stderr[-2000:] + bare.stdout[-2000:])
        assert "200 delivered" in bare.stdout and "ncalls" not in bare.stdout, edge
        cpu = [line for line in bare.stdout.splitlines()
               if line.startswith("worker_cpu_us_per_msg=")]
        assert len(cpu) == 1 and float(cpu[0].split("=")[1]) > 0, (edge, bare.stdout)


def test_edge_variants_get_what_their_listeners_need(tmp_path):
    # S1E and S1B: the session client sends a PROXY v2 header to minismtp-proxy and AUTH
    # PLAIN to the AUTH variants, and nothing of the sort to minismtp-discard; each run
    # would fail otherwise (a PROXY port answers nothing without its header, and the
    # AUTH variants require AUTH before MAIL). minismtp-limits runs once this checkout's
    # minismtp takes `limits.per_client`, and until then is skipped, saying why.
    done, report = run_bench(
        tmp_path, "--scenarios", "S1E,S1B",
        "--servers", "minismtp-discard,minismtp-proxy,minismtp-auth,minismtp-limits,"
                     "minismtp-bcrypt5,minismtp-auth-pipelined")
    assert done.returncode == 0, done.stderr[-2000:]
    by_key = {(e["scenario"], e["server"]): e for e in report["results"]}
    limits = by_key[("S1E", "minismtp-limits")]
    if limits["status"] == "skipped":
        assert "limits.per_client" in limits["reason"]
    for key in (("S1E", "minismtp-discard"), ("S1E", "minismtp-proxy"),
                ("S1E", "minismtp-auth"), ("S1B", "minismtp-auth"),
                ("S1E", "minismtp-auth-pipelined"),
                ("S1B", "minismtp-bcrypt5"), *([("S1E", "minismtp-limits")]
                                               if limits["status"] != "skipped" else [])):
        entry = by_key[key]
        assert entry["status"] == "ok", entry
        assert "log_problems" not in entry, entry  # accept_any's start-up warning is expected
        [run] = entry["runs"]
        assert run["ok"] and run["messages"] == run["requested"] == entry["messages_per_run"]
        assert run["server_cpu_us_per_msg"] > 0
    # Skipped where they cannot run: the PROXY variant needs its header (S1E's client).
    assert by_key[("S1B", "minismtp-proxy")]["status"] == "skipped"
    assert by_key[("S1B", "minismtp-bcrypt5")]["median"]["server_cpu_us_per_msg"] > 0
    s1e = rows(done.stdout, "S1E")
    assert "us/msg" in s1e["minismtp-proxy"] and "msgs/s" in s1e["minismtp-proxy"]
    assert "AUTHs per CPU-second" in rows(done.stdout, "S1B")["minismtp-bcrypt5"]
