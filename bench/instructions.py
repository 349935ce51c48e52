"""Instructions a worker executes per S1E message, by edge feature: the steady figure
behind bench/run.py's noisy end-to-end ratios.

    python bench/instructions.py                          # every edge, 1,000 and 3,000 messages
    python bench/instructions.py --edges none,proxy --messages 2000
    python bench/instructions.py --repeat 5                # medians of 5 pairs each

Each edge of `bench/profile_worker.py` (none, proxy, noop, auth, auth-pipelined, limits,
proxy-limits) runs twice under valgrind's callgrind with `--no-profile`: one worker in
process, fed by S1E's client (bench/session_client.py) from another process, which
callgrind does not follow.
The difference between a run of 3N messages and one of N, divided by 2N, is the worker's
instructions per message, start-up and shut-down cancelled out; the count repeats to
about 1% between runs (PROXY's to 1-2%: how connections and their headers meet the
loop's turns varies), where end-to-end CPU per message moves by 5-10% on a shared
machine. `--repeat R` measures each edge R times and prints the medians, with the
lowest and highest. Per-client limits share their counts by the clock: here every
FLUSH_UNDER_CALLGRIND_S, about as often per session as a worker at full speed flushes
every 10 ms. What it leaves out is the kernel's work (system calls, loopback TCP) and
what instructions cost in time (cache misses): a feature that adds a system call per
session, as a PROXY header's read does, costs more end to end than its instructions say.

Needs valgrind (Debian's `valgrind` package). Two runs at a time (one per core of a
2-core machine); each takes about 20 s at the default counts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
EDGES = ("none", "proxy", "noop", "auth", "auth-pipelined", "limits", "proxy-limits")
# Per-client counts are shared by the clock (clientlimits.FLUSH_S, 10 ms). Under callgrind
# a worker runs some 50 times slower, so 10 ms would hold a flush for every session or two
# where at full speed one serves dozens: the flush's share would depend on the slowdown.
FLUSH_UNDER_CALLGRIND_S = 0.5


def instructions(edge: str, messages: int, workdir: Path) -> int:
    """Instructions the worker process ran for `messages` S1E messages on `edge`."""
    out = workdir / f"callgrind.{edge}.{messages}"
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
               str(HERE / "profile_worker.py"), "S1E", "--edge", edge, "--no-profile",
               "--flush-s", str(FLUSH_UNDER_CALLGRIND_S),
               "--messages", str(messages)]
    ran = subprocess.run(command, capture_output=True, text=True)
    if ran.returncode != 0 or not out.exists():
        tail = "\n".join((ran.stdout + ran.stderr).splitlines()[-5:])
        raise RuntimeError(f"{edge}, {messages} messages: exit {ran.returncode}\n{tail}")
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"{out}: no summary line")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", default=",".join(EDGES),
                        help=f"comma-separated, from {', '.join(EDGES)} (default: all)")
    parser.add_argument("--messages", type=int, default=1000,
                        help="N: runs of N and 3N messages are compared (default 1000)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="R: each edge measured R times, medians shown (default 1)")
    args = parser.parse_args(argv)
    edges = args.edges.split(",")
    unknown = [edge for edge in edges if edge not in EDGES]
    if unknown:
        parser.error(f"unknown edge(s): {', '.join(unknown)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")
    n, repeat = args.messages, args.repeat
    with tempfile.TemporaryDirectory(prefix="minismtp-instructions-") as tmp, \
            concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for rep in range(repeat):
            (Path(tmp) / f"r{rep}").mkdir()
        # Rounds in turn, each edge once per round: a drift in the machine's state
        # touches every edge alike.
        runs = {(rep, edge, count): pool.submit(instructions, edge, count,
                                                Path(tmp) / f"r{rep}")
                for rep in range(repeat) for edge in edges for count in (n, 3 * n)}
        samples = {edge: sorted((runs[rep, edge, 3 * n].result()
                                 - runs[rep, edge, n].result()) / (2 * n)
                                for rep in range(repeat)) for edge in edges}
    per_message = {edge: statistics.median(values) for edge, values in samples.items()}
    what = f"median of {repeat}, " if repeat > 1 else ""
    print(f"worker instructions per S1E message (callgrind; {what}{3 * n:,} against "
          f"{n:,} messages)")
    base, noop = per_message.get("none"), per_message.get("noop")
    for edge in edges:
        ratio = f"  {per_message[edge] / base:.3f}x none" if base and edge != "none" else ""
        if edge == "auth" and noop:  # AUTH's own cost, without the command turn it adds
            ratio += f", {per_message[edge] / noop:.3f}x noop"
        spread = (f"  ({samples[edge][0]:,.0f}-{samples[edge][-1]:,.0f})"
                  if repeat > 1 else "")
        print(f"  {edge:14s} {per_message[edge]:10,.0f}{ratio}{spread}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
