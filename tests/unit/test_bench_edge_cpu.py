"""bench/edge_cpu.py: a worker's CPU per message per edge feature, as per-round ratios."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def edge_cpu(monkeypatch):
    spec = importlib.util.spec_from_file_location("edge_cpu", ROOT / "bench" / "edge_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_round_runs_every_edge_in_a_rotated_order_and_ratios_stay_within_it(
        edge_cpu, monkeypatch, tmp_path, capsys):
    # The machine drifts from round to round; within one, proxy costs 1.05x and
    # limits 1.20x of none.
    order: list[str] = []
    cost = {"none": 1.0, "proxy": 1.05, "limits": 1.20}

    def fake(edge, messages, pin):
        order.append(edge)
        assert messages == 500 and pin == "0,1"
        return 100.0 * (1 + (len(order) - 1) // 3) * cost[edge]  # one level per round

    monkeypatch.setattr(edge_cpu, "worker_cpu", fake)
    assert edge_cpu.main(["--edges", "proxy,limits", "--rounds", "3", "--messages", "500",
                          "--pin", "0,1", "--json", str(tmp_path / "runs.json")]) == 0
    assert order == ["none", "proxy", "limits", "proxy", "limits", "none",
                     "limits", "none", "proxy"]
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "1.050x (1.050-1.050)" in rows["proxy"]
    assert "1.200x (1.200-1.200)" in rows["limits"]
    assert "x" not in rows["none"].split("us")[1]  # no ratio of none to itself
    saved = json.loads((tmp_path / "runs.json").read_text())
    assert len(saved["runs"]["limits"]) == 3 and saved["pin"] == "0,1"


def test_an_unknown_edge_is_refused(edge_cpu, capsys):
    with pytest.raises(SystemExit) as stopped:
        edge_cpu.main(["--edges", "proxy,magic"])
    assert stopped.value.code == 2 and "unknown edges: magic" in capsys.readouterr().err


def test_a_failed_run_names_its_edge_and_output(edge_cpu, monkeypatch):
    class Ran:
        returncode, stdout, stderr = 1, "S1E: client failed\n", "boom\n"

    monkeypatch.setattr(edge_cpu.subprocess, "run", lambda *a, **k: Ran())
    with pytest.raises(RuntimeError, match="auth: exit 1") as failed:
        edge_cpu.worker_cpu("auth", 10, "")
    assert "boom" in str(failed.value)


def test_the_worker_figure_is_read_from_its_line(edge_cpu, monkeypatch):
    class Ran:
        returncode, stderr = 0, ""
        stdout = "S1E: 10 messages ...\nworker_cpu_us_per_msg=123.500\n"

    seen = {}
    monkeypatch.setattr(edge_cpu.subprocess, "run",
                        lambda command, **k: seen.setdefault("command", command) and Ran())
    assert edge_cpu.worker_cpu("proxy", 10, "0,1") == 123.5
    assert seen["command"][:2] == [sys.executable, str(ROOT / "bench" / "profile_worker.py")]
    assert seen["command"][-2:] == ["--pin", "0,1"]
