"""The worker's Python cost per message, without the kernel: fake sockets, no selector.

    python bench/worker_python.py              # S1- and S2-shaped sessions, best of 5
    python bench/worker_python.py --messages 50000 --repeat 9

End-to-end figures (bench/run.py) mix minismtp's Python with the kernel's loopback TCP
work and the scheduler, and move by 5-10% between runs on a shared machine. This drives a
real `Worker` (discard delivery, default limits) through its own read, core, decision and
flush code with scripted in-memory sockets, so what is left is the Python cost alone,
steady to about 3%: the figure to watch when changing the command path. It leaves out
what only a real socket costs (the socket object, the selector, the syscalls).

- S1 shape: a new connection per message: greeting, HELO, MAIL, RCPT, DATA, 1 KiB body,
  QUIT (each command in its own read, as from smtp-source).
- S2 shape: one connection, then MAIL, RCPT, DATA, body per message.

`--per-client` sets all three `limits.per_client` limits, too high to refuse anything,
with a real shared table (anvil.py): each session is counted and released, each RCPT
counted, all from one client address; each read is a turn of the loop, after which the
per-minute counts are flushed to the table when due, as Worker.run does. Its difference to a run without is the per-client
limits' cost per message.

`--log FILE` runs at `logging.level: info`, the default (without it: `warning`), with the
log written to FILE: each message's and session's line formatted and held, and written
out in batches when due, as Worker.run does (msglog.py). Its difference to a run without
is the default logging's cost per message.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minismtp.anvil import ClientTable  # noqa: E402
from minismtp.config import load_config  # noqa: E402
from minismtp.delivery import make_backend  # noqa: E402
from minismtp.heartbeat import HeartbeatBoard  # noqa: E402
from minismtp.logboard import LogBoard  # noqa: E402
from minismtp.logsetup import setup_logging  # noqa: E402
from minismtp.session import Profile  # noqa: E402
from minismtp.stats import StatsBoard  # noqa: E402
from minismtp.worker import Worker  # noqa: E402

BODY = (b"X" * 78 + b"\r\n") * 12 + b".\r\n"  # about 1 KiB, as smtp-source -l 1024 sends
TRANSACTION = [b"MAIL FROM:<foo@localhost>\r\n", b"RCPT TO:<bar@localhost>\r\n",
               b"DATA\r\n", BODY]
CONNECTION = [b"HELO localhost\r\n", *TRANSACTION, b"QUIT\r\n"]


class ScriptedSocket:
    """Hands out one scripted read per recv_into; takes every send whole."""

    __slots__ = ("reads", "next", "fd", "sends")

    def __init__(self, reads: list[bytes], fd: int) -> None:
        self.reads, self.next, self.fd, self.sends = reads, 0, fd, 0

    def fileno(self) -> int:
        return self.fd

    def setblocking(self, flag: bool) -> None:
        pass

    def setsockopt(self, *args: object) -> None:
        pass

    def recv_into(self, view: memoryview) -> int:
        if self.next == len(self.reads):
            raise BlockingIOError
        data = self.reads[self.next]
        self.next += 1
        view[:len(data)] = data
        return len(data)

    def send(self, data: bytes, flags: int = 0) -> int:
        self.sends += 1
        return len(data)

    def shutdown(self, how: int) -> None:
        pass

    def recv(self, size: int) -> bytes:
        return b""

    def close(self) -> None:
        pass


class NoPoller:
    def register(self, *args: object) -> None:
        pass

    modify = unregister = forget = register


PER_CLIENT = {"max_sessions": 10**6, "max_new_sessions_per_minute": 10**9,
              "max_recipients_per_minute": 10**9}


def make_worker(per_client: bool = False, log: str = "warning") -> Worker:
    overrides = {"delivery.backend": "discard", "logging.level": log}
    clients = None
    if per_client:
        overrides["limits.per_client"] = PER_CLIENT
        clients = ClientTable(16384, 1)
        clients.hand_out(0)
    config = load_config(overrides=overrides)
    backend = make_backend("discard", "", False, "single", config.server.hostname)
    worker = Worker(config, [], backend, HeartbeatBoard(1), 0, StatsBoard(1, 64),
                    clients=clients, log_board=LogBoard(1))
    worker.poller = NoPoller()  # type: ignore[assignment]
    # As Worker.run() does before its loop: what is alive now stays out of the
    # collector's passes, which otherwise grow with every module imported.
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])
    # The sessions' listener: the configuration's first, plaintext, top-level fault rules.
    profile = Profile(config, config.server.listen[0], worker.stats.listeners[0], tls=False)
    profile.decide, profile.handlers = worker.decide, worker.decide.handlers
    worker.profiles[None] = profile  # type: ignore[index]
    return worker


def end_of_turn(worker: Worker) -> None:
    """What the loop does after each turn: read its clock, write the held log lines out
    and, for limits.per_client, share the counts, when they are due (Worker.run)."""
    worker.now = now = time.monotonic()
    if now >= worker.msglog.due:
        worker.msglog.flush()
    gate = worker.gate
    if gate is not None and gate.table.pending and now >= gate.flush_at:
        gate.flush()


def s1_shape(worker: Worker, messages: int) -> None:
    for n in range(messages):
        sock = ScriptedSocket(CONNECTION, 1000 + n % 64)
        worker._start_sessions([(sock, ("127.0.0.1", 40000), None)])  # type: ignore[list-item]
        end_of_turn(worker)
        session = worker.sessions[sock.fd]
        for _ in CONNECTION:
            worker._on_readable(session)
            end_of_turn(worker)
        if not session.closed or sock.sends != len(CONNECTION) + 1:
            raise SystemExit("S1 shape: the session did not run to its 221")


def s2_shape(worker: Worker, messages: int) -> None:
    sock = ScriptedSocket([b"HELO localhost\r\n"] + TRANSACTION * messages, 999)
    worker._start_sessions([(sock, ("127.0.0.1", 40000), None)])  # type: ignore[list-item]
    session = worker.sessions[sock.fd]
    for _ in range(len(sock.reads)):
        worker._on_readable(session)
        end_of_turn(worker)
    if sock.sends != len(sock.reads) + 1:
        raise SystemExit("S2 shape: a reply is missing")
    worker.close(session, "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--shape", choices=("S1", "S2"), help="only this one (default both)")
    parser.add_argument("--per-client", action="store_true",
                        help="with limits.per_client set (see the docstring)")
    parser.add_argument("--log", metavar="FILE",
                        help="logging.level info (the default), the log written to FILE")
    args = parser.parse_args()
    if args.log:
        sys.stderr = open(args.log, "w", encoding="utf-8")  # noqa: SIM115 (for the run)
        setup_logging("info")
    worker = make_worker(args.per_client, "info" if args.log else "warning")
    print(f"Python {sys.version.split()[0]}, {args.messages:,} messages, "
          f"best and median of {args.repeat}"
          f"{', limits.per_client set' if args.per_client else ''}")
    shapes = [(name, shape) for name, shape in (("S1 shape", s1_shape), ("S2 shape", s2_shape))
              if args.shape is None or name.startswith(args.shape)]
    for name, shape in shapes:
        shape(worker, 1000)  # warm-up
        costs = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            shape(worker, args.messages)
            costs.append((time.perf_counter() - started) / args.messages * 1e6)
        print(f"  {name}: {min(costs):6.2f} us/message (median {statistics.median(costs):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
