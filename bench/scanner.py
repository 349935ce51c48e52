"""DATA body scanner throughput, in memory: BodyScanner, the full core, and a naive loop.

Run from the repository root:

    python bench/scanner.py [--size-mib 10] [--repeat 7] [--json FILE]

Each body is about `--size-mib` MiB of CRLF lines ("line" in the table: body line length,
CRLF included), dot-stuffed and followed by ".\\r\\n":

- typical: 76-byte lines (74 base64 characters + CRLF), as in an attachment: no dots;
- prose:   the same lines with two full stops in each (inside the line, like sentences);
- dotted:  every line starts with "." (the worst case: every line is stuffed, "..xx\\r\\n");
- short:   10-byte lines (8 characters + CRLF).

Implementations, all reading the wire bytes in 256 KiB pieces:

- BodyScanner:     minismtp.smtp.scanner.BodyScanner looped over a 256 KiB ReceiveBuffer the way the
                 core does; each read is copied in by slice assignment (standing in for
                 recv_into), and the segments of one read are collected as memoryviews;
- core (bare LF normalize/reject/allow): SmtpServerConnection already in DATA (EHLO,
                 MAIL, RCPT and DATA accepted), fed through buffer.free_view()/commit(n),
                 counting BodyChunk bytes; Settings(max_message_bytes=1<<30), each
                 bare_lf policy;
- naive:         what a straightforward Python server does: split each read on CRLF with
                 a per-line loop, unstuff, stop at ".", keep the lines in a list and join.

Every implementation writes its body into an output bytearray (the stand-in for the
writev to the spool, so its cost is inside the timing); after each run the output length
and SHA-256 are checked against the expected body, built once, so a broken scanner cannot
post a number. The figure is the median over `--repeat` runs of MB/s, MB = 10**6 bytes of
wire input (stuffing and terminator included) per second; "x naive" is the ratio to the
naive loop on the same body. The targets (>= 1 GB/s and >= 20x naive on the typical body)
are judged from these runs.
"""

from __future__ import annotations

import argparse
import base64
import gc
import hashlib
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout

from minismtp.smtp.buffer import ReceiveBuffer  # noqa: E402
from minismtp.smtp.events import NEED_DATA, BodyChunk, MessageEnd  # noqa: E402
from minismtp.smtp.protocol import Settings, SmtpServerConnection  # noqa: E402
from minismtp.smtp.scanner import BodyScanner  # noqa: E402

READ = 256 * 1024  # bytes per simulated recv_into, and the BodyScanner receive buffer
TARGET_MBPS, TARGET_RATIO = 1000.0, 20.0  # 1 GB/s and 20x naive, on the typical body
SETUP = b"EHLO b.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@b.example>\r\nDATA\r\n"


class Body:
    def __init__(self, name: str, text_len: int, dotted: bool, size: int,
                 prose: bool = False) -> None:
        rng = random.Random(text_len * 2 + dotted)  # deterministic content per body
        n_lines = max(1, size // (text_len + 2))
        chars = base64.b64encode(rng.randbytes(n_lines * text_len * 3 // 4 + 3))
        lines = [chars[i * text_len:(i + 1) * text_len] for i in range(n_lines)]
        lines = [b"." + line[1:] for line in lines] if dotted else lines
        if prose:  # full stops inside every line, never at its start
            lines = [line[:20] + b"." + line[21:60] + b"." + line[61:] for line in lines]
        self.name = name
        self.body = b"".join(line + b"\r\n" for line in lines)
        self.wire = b"".join(
            (b"." + line if line[:1] == b"." else line) + b"\r\n" for line in lines) + b".\r\n"
        self.digest = hashlib.sha256(self.body).digest()


def run_BodyScanner(wire: bytes, out: bytearray) -> int:
    """Drive BodyScanner over a ReceiveBuffer as the core does; return bytes written."""
    rb = ReceiveBuffer(READ)
    wv = memoryview(wire)
    off = o = 0
    scanner = BodyScanner()
    segs: list[memoryview] = []
    while True:
        view = rb.free_view()
        n = min(len(view), len(wire) - off)
        if n == 0:
            raise RuntimeError("wire exhausted before the terminator")
        view[:n] = wv[off:off + n]
        rb.commit(n)
        off += n
        data, end = rb.data, rb.end
        done = False
        while True:
            pos = rb.start
            rb.start = scanner.step(data, pos, end)
            done = scanner.done
            if scanner.copied is not None:
                segs.append(memoryview(scanner.copied))
            elif scanner.stop > scanner.start:
                segs.append(rb.view(scanner.start, scanner.stop))
            if done or rb.start == pos:
                break  # the terminator, or more bytes needed
        for seg in segs:  # one gathered write per read
            out[o:o + len(seg)] = seg
            o += len(seg)
        segs.clear()
        if done:
            return o


def core_in_data(bare_lf: str):
    """A connection with EHLO, MAIL, RCPT and DATA accepted (set up outside the timing)."""
    conn = SmtpServerConnection(Settings(max_message_bytes=1 << 30, bare_lf=bare_lf))
    conn.greet()
    conn.receive_data(SETUP)
    for _ in range(4):  # Hello, MailFrom, RcptTo, DataStarted
        conn.next_event()
        conn.accept()
    conn.data_to_send()
    if conn.state.name != "DATA":
        raise RuntimeError(f"setup failed, core is in {conn.state}")
    return lambda wire, out: run_core(conn, wire, out)


def run_core(conn: SmtpServerConnection, wire: bytes, out: bytearray) -> int:
    """Feed the body through free_view()/commit(n); return BodyChunk bytes written."""
    wv = memoryview(wire)
    buf = conn.buffer
    off = o = 0
    total = len(wv)
    while True:
        view = buf.free_view()
        n = min(len(view), READ, total - off)
        if n == 0:
            raise RuntimeError("wire exhausted before the terminator")
        view[:n] = wv[off:off + n]
        buf.commit(n)
        off += n
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            kind = type(event)
            if kind is BodyChunk:
                out[o:o + len(event.data)] = event.data
                o += len(event.data)
            elif kind is MessageEnd:
                if event.size != o:
                    raise RuntimeError(f"MessageEnd size {event.size} != {o} bytes of chunks")
                conn.accept("bench")
                return o
            else:
                raise RuntimeError(f"unexpected event {event!r}")


def run_naive(wire: bytes, out: bytearray) -> int:
    """Line by line: split on CRLF, unstuff, stop at "."; lines kept in a list."""
    lines: list[bytes] = []
    pending = b""
    for off in range(0, len(wire), READ):
        pending += wire[off:off + READ]  # a recv() returns new bytes
        pos = 0
        while True:
            i = pending.find(b"\r\n", pos)
            if i < 0:
                break
            line = pending[pos:i + 2]
            pos = i + 2
            if line[:1] == b".":
                if line == b".\r\n":
                    body = b"".join(lines)
                    out[:len(body)] = body
                    return len(body)
                line = line[1:]
            lines.append(line)
        pending = pending[pos:]
    raise RuntimeError("wire exhausted before the terminator")


IMPLEMENTATIONS = {  # name -> prepare() returning run(wire, out) -> bytes written
    "BodyScanner": lambda: run_BodyScanner,
    "core (bare LF normalize)": lambda: core_in_data("normalize"),
    "core (bare LF reject)": lambda: core_in_data("reject"),
    "core (bare LF allow)": lambda: core_in_data("accept"),
    "naive": lambda: run_naive,
}


def measure(prepare, body: Body, repeat: int) -> list[float]:
    """Seconds per run; each run's output is checked against the expected body."""
    times = []
    for _ in range(repeat):
        out = bytearray(len(body.body))
        run = prepare()
        gc.collect()
        t0 = time.perf_counter()
        n = run(body.wire, out)
        elapsed = time.perf_counter() - t0
        if n != len(body.body) or hashlib.sha256(memoryview(out)[:n]).digest() != body.digest:
            raise SystemExit(f"{body.name}: output differs from the expected body ({n} bytes)")
        times.append(elapsed)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=float, default=10.0, help="body size in MiB (default 10)")
    p.add_argument("--repeat", type=int, default=7, help="runs per measurement (default 7)")
    p.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    args = p.parse_args(argv)
    size = int(args.size_mib * (1 << 20))
    bodies = [Body("typical", 74, False, size), Body("prose", 74, False, size, prose=True),
              Body("dotted", 74, True, size),
              Body("short", 8, False, size)]

    print(f"Python {platform.python_version()} on {platform.machine()}, "
          f"{args.size_mib:g} MiB bodies, {READ // 1024} KiB reads, median of {args.repeat}")
    results: dict[str, dict[str, dict]] = {}
    for body in bodies:
        results[body.name] = {}
        for name, impl in IMPLEMENTATIONS.items():
            times = measure(impl, body, args.repeat)
            med = statistics.median(times)
            results[body.name][name] = {"seconds": times, "median_s": med,
                                        "mb_per_s": len(body.wire) / med / 1e6}
        naive = results[body.name]["naive"]["mb_per_s"]
        for r in results[body.name].values():
            r["x_naive"] = r["mb_per_s"] / naive

    header = (f"{'body':<8} {'line':>5} {'wire bytes':>11} {'implementation':<22} "
              f"{'MB/s':>9} {'x naive':>8}")
    print(f"\n{header}\n{'-' * len(header)}")
    for body in bodies:
        line_len = body.body.index(b"\n") + 1
        for name, r in results[body.name].items():
            print(f"{body.name:<8} {line_len:>5} {len(body.wire):>11} {name:<22} "
                  f"{r['mb_per_s']:>9.1f} {r['x_naive']:>7.1f}x")
        print()

    print(f"Targets on the typical body: >= {TARGET_MBPS:g} MB/s and >= {TARGET_RATIO:g}x naive")
    for name, r in list(results["typical"].items())[:-1]:  # all but naive
        speed = "met" if r["mb_per_s"] >= TARGET_MBPS else "NOT met"
        ratio = "met" if r["x_naive"] >= TARGET_RATIO else "NOT met"
        print(f"  {name:<22} {r['mb_per_s']:>9.1f} MB/s: {speed:<8} "
              f"{r['x_naive']:>6.1f}x naive: {ratio}")

    if args.json:
        report = {"python": platform.python_version(), "machine": platform.machine(),
                  "size_mib": args.size_mib, "repeat": args.repeat, "read_bytes": READ,
                  "targets": {"mb_per_s": TARGET_MBPS, "x_naive": TARGET_RATIO},
                  "bodies": {b.name: {"body_bytes": len(b.body), "wire_bytes": len(b.wire),
                                      "results": results[b.name]} for b in bodies}}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"raw numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
