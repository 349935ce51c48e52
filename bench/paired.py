"""Each round's ratio of one server to another, pooled over the JSON files of several runs.

    python bench/run.py --scenarios S1E --runs 7 --json a.json   # and again, b.json
    python bench/paired.py a.json b.json                          # each edge to discard
    python bench/paired.py s2.json --scenario S2 --against minismtp-discard

A run's table compares medians, each server's over its own rounds. On a shared machine
the rounds drift (another program, a warmer cache), and two medians of the same build
moved by 10% between runs. The servers of one round run back to back, so a round's ratio
of one to another sees mostly the same drift: this takes, for each server, that ratio in
every round of every file given, and prints its median and quartiles, for the server CPU
per message and for messages per second. A `NAME@baseline` row is compared with the
`--against` server of the baseline checkout, in the same round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="bench/run.py --json files")
    parser.add_argument("--scenario", default="S1E")
    parser.add_argument("--against", default="minismtp-discard",
                        help="the server each round's ratio is to (default minismtp-discard)")
    args = parser.parse_args(argv)
    cpu: dict[str, list[float]] = {}
    rate: dict[str, list[float]] = {}
    for path in args.files:
        with open(path, encoding="utf-8") as file:
            results = json.load(file)["results"]
        runs = {r["server"]: r["runs"] for r in results
                if r["scenario"] == args.scenario and r.get("runs")}
        for name, rounds in runs.items():
            against = args.against + ("@baseline" if name.endswith("@baseline") else "")
            if name == against or against not in runs:
                continue
            for mine, theirs in zip(rounds, runs[against]):
                if mine.get("ok") and theirs.get("ok"):
                    cpu.setdefault(name, []).append(
                        mine["server_cpu_us_per_msg"] / theirs["server_cpu_us_per_msg"])
                    rate.setdefault(name, []).append(mine["msgs_per_s"] / theirs["msgs_per_s"])
    if not cpu:
        print(f"no rounds of {args.scenario} beside {args.against}", file=sys.stderr)
        return 1
    print(f"{args.scenario}, each round's ratio to {args.against}: median (quartiles)")
    for name in sorted(cpu):
        print(f"  {name:32s} rounds {len(cpu[name]):3d}   CPU per message "
              f"{_spread(cpu[name])}   messages per second {_spread(rate[name])}")
    return 0


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}x"
    median, low, high = median_and_quartiles(values)
    return f"{median:.3f}x ({low:.2f}-{high:.2f})"


def median_and_quartiles(values: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile) of per-round ratios, as every bench tool
    that pools rounds reports them (bench/edge_cpu.py too)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, _, high = statistics.quantiles(values, n=4)
    return statistics.median(values), low, high


if __name__ == "__main__":
    sys.exit(main())
