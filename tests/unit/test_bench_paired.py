"""bench/paired.py: each round's ratio of a server to another, pooled over run.py files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_run(path: Path, rounds: dict[str, list[tuple[float, float]]]) -> Path:
    """A run.py --json file: per server, (CPU us per message, messages per second) by round."""
    results = [{"scenario": "S1E", "server": server, "runs": [
        {"ok": True, "server_cpu_us_per_msg": cpu, "msgs_per_s": rate} for cpu, rate in runs]}
        for server, runs in rounds.items()]
    path.write_text(json.dumps({"meta": {}, "results": results, "targets": []}))
    return path


def test_each_round_is_compared_within_itself_and_rounds_pool_over_files(tmp_path):
    # The machine drifts between rounds: the ratios stay 1.10x and 0.90x in every one.
    first = write_run(tmp_path / "a.json", {
        "minismtp-discard": [(100, 1000), (200, 500)],
        "minismtp-proxy": [(110, 900), (220, 450)],
        "minismtp-discard@baseline": [(100, 1000), (100, 1000)],
        "minismtp-proxy@baseline": [(130, 800), (130, 800)]})
    second = write_run(tmp_path / "b.json", {
        "minismtp-discard": [(150, 700)], "minismtp-proxy": [(165, 630)]})
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "paired.py"), str(first),
                           str(second)], capture_output=True, text=True, check=True)
    lines = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    assert set(lines) == {"minismtp-proxy", "minismtp-proxy@baseline"}
    assert "rounds   3" in lines["minismtp-proxy"]
    assert "CPU per message 1.100x (1.10-1.10)" in lines["minismtp-proxy"]
    assert "messages per second 0.900x" in lines["minismtp-proxy"]
    assert "rounds   2" in lines["minismtp-proxy@baseline"]  # against the baseline's discard
    assert "CPU per message 1.300x" in lines["minismtp-proxy@baseline"]


def test_no_rounds_beside_the_server_named_is_an_error(tmp_path):
    only = write_run(tmp_path / "a.json", {"minismtp-proxy": [(110, 900)]})
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "paired.py"), str(only)],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "no rounds of S1E beside minismtp-discard" in done.stderr
