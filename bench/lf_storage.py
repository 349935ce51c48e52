"""What storing LF line endings costs a Maildir write, in CPU, without the disk.

    python bench/lf_storage.py                 # 10 MiB of 80-byte lines, 30 repeats
    python bench/lf_storage.py --line 998 --repeat 50

A real MaildirSink takes the body in the 256 KiB pieces a worker's DATA reads hand it,
once with `delivery.line_endings: lf` (the default: each piece converted before it is
written) and once with `crlf` (written as it came). Its descriptor is swapped for
/dev/null, so what is timed is the sink's own work: process CPU time, median per 10 MiB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minismtp.delivery import Peer  # noqa: E402
from minismtp.delivery.maildir import MaildirBackend  # noqa: E402
from minismtp.smtp.events import Envelope  # noqa: E402

PIECE = 256 * 1024
SIZE = 10 * 1024 * 1024


def cost(line_endings: str, pieces: list[memoryview], repeat: int, folder: str) -> list[float]:
    backend = MaildirBackend(folder, fsync=False, line_endings=line_endings)
    backend.prepare()
    sink = backend.open(Envelope("client.bench", True, "a@bench.invalid", ("b@bench.invalid",)),
                        Peer("127.0.0.1", 40000))
    real, null = sink._fd, os.open(os.devnull, os.O_WRONLY)
    sink._fd = null  # the sink's work only: no page cache, no disk
    try:
        costs = []
        for _ in range(repeat):
            started = time.process_time()
            for piece in pieces:
                sink.write(piece)
            costs.append(time.process_time() - started)
        return costs
    finally:
        sink._fd = real
        sink.abort()
        os.close(null)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--line", type=int, default=80, help="line length, CRLF included")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    line = b"x" * (args.line - 2) + b"\r\n"
    body = line * (SIZE // len(line))
    pieces = [memoryview(body)[at:at + PIECE] for at in range(0, len(body), PIECE)]
    with tempfile.TemporaryDirectory(prefix="lf-storage-") as folder:
        for line_endings in ("crlf", "lf"):
            costs = cost(line_endings, pieces, args.repeat, os.path.join(folder, line_endings))
            print(f"{line_endings}: median {statistics.median(costs) * 1e3:.1f} ms, "
                  f"min {min(costs) * 1e3:.1f} ms of CPU per 10 MiB of {args.line}-byte lines "
                  f"({args.repeat} repeats)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
