"""A worker's CPU per S1E message (user and system time) with each edge feature, as ratios
to the same worker without it, round by round: the end-to-end cost of a feature, kernel
included, with less of bench/run.py's noise.

    python bench/edge_cpu.py                               # every edge, 15 rounds
    python bench/edge_cpu.py --edges none,proxy,limits --rounds 30 --pin 0,1

Each run is `bench/profile_worker.py S1E --edge E --no-profile`: one worker in its own
process, its thread's CPU clock read just before S1E's client (another process) starts
and just after it ends. A round runs every edge once, in an order that rotates from
round to round; each edge's ratio to `none` in the same round is one sample, and the
median and quartiles of those are printed, with the median CPU per message. What this
leaves out, and bench/run.py measures: the master, a second worker, and the client's
pace (messages per second). `--pin W,C` keeps the worker on CPU W and the client on C.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from paired import median_and_quartiles  # noqa: E402
EDGES = ("none", "proxy", "noop", "auth", "auth-pipelined", "limits", "proxy-limits")
MARK = "worker_cpu_us_per_msg="


def worker_cpu(edge: str, messages: int, pin: str) -> float:
    """Microseconds of the worker's CPU per message, for one run on `edge`."""
    command = [sys.executable, str(HERE / "profile_worker.py"), "S1E", "--edge", edge,
               "--no-profile", "--messages", str(messages)] + (["--pin", pin] if pin else [])
    ran = subprocess.run(command, capture_output=True, text=True, timeout=600)
    for line in ran.stdout.splitlines():
        if line.startswith(MARK) and ran.returncode == 0:
            return float(line[len(MARK):])
    tail = "\n".join((ran.stdout + ran.stderr).splitlines()[-5:])
    raise RuntimeError(f"{edge}: exit {ran.returncode}\n{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", default=",".join(EDGES),
                        help=f"comma-separated, from {', '.join(EDGES)}; none is always run")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--messages", type=int, default=10_000, help="per run (default 10,000)")
    parser.add_argument("--pin", default="", metavar="W,C",
                        help="the worker on CPU W, the client on CPU C")
    parser.add_argument("--json", help="write every run's figure to this file")
    args = parser.parse_args(argv)
    edges = ["none"] + [edge for edge in args.edges.split(",") if edge != "none"]
    unknown = [edge for edge in edges if edge not in EDGES]
    if unknown:
        parser.error(f"unknown edges: {', '.join(unknown)}")
    runs: dict[str, list[float]] = {edge: [] for edge in edges}
    for round_number in range(args.rounds):
        shift = round_number % len(edges)
        for edge in edges[shift:] + edges[:shift]:
            runs[edge].append(worker_cpu(edge, args.messages, args.pin))
        print(f"round {round_number + 1}/{args.rounds}: " + ", ".join(
            f"{edge} {runs[edge][-1]:.1f}" for edge in edges), file=sys.stderr, flush=True)
    print(f"S1E worker CPU per message, {args.rounds} rounds of {args.messages:,} messages"
          f"{', pinned ' + args.pin if args.pin else ''}: median us, then each round's "
          "ratio to none (median, quartiles)")
    for edge in edges:
        line = f"{edge:>13}  {statistics.median(runs[edge]):7.1f} us"
        if edge != "none":
            median, low, high = median_and_quartiles([mine / base for mine, base
                                                      in zip(runs[edge], runs["none"])])
            line += f"  {median:.3f}x ({low:.3f}-{high:.3f})"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"messages": args.messages, "pin": args.pin,
                                               "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
