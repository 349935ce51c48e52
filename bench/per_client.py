"""The per-client limits' own calls, in a loop: what a session and a recipient cost.

    python bench/per_client.py            # best of 7 runs of 100,000 calls each

Times a worker's `ClientGate` over a real shared table (anvil.py) made as the master
makes it (1024 worker slots), with two slots handed out and every limit set too high to
refuse: a known client's session admitted and released, a recipient counted, and the
flush of one client's pending counts that a busy worker's loop makes at most every
`clientlimits.FLUSH_S`. Then sessions of clients the table has not seen, one each (an
MX's usual traffic, and S1E's `minismtp-proxy-limits`): into a table with room, and into
a full one, where each takes the entry of the least recently seen client of its window;
with a flush every 50 sessions, as a worker's loop at a few thousand sessions a second.
In a worker the calls cost more than here, where they find everything in the CPU's
caches: `bench/worker_python.py --per-client` measures them in place, and
`bench/run.py --servers minismtp-discard,minismtp-perclient` end to end.
"""

from __future__ import annotations

import sys
import time
import timeit
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minismtp.anvil import ClientTable  # noqa: E402
from minismtp.clientlimits import ClientGate, PerClient  # noqa: E402
from minismtp.delivery import Peer  # noqa: E402
from minismtp.smtp.events import RcptTo  # noqa: E402
from minismtp.stats import WorkerStats  # noqa: E402

CALLS = 100_000
NEW_CLIENTS = 10_000  # per run; a 16,384-entry table keeps room for them
FLUSH_EVERY = 50


def client_address(n: int) -> str:
    return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


def new_clients_us(full: bool, repeat: int = 7) -> float:
    """Best of `repeat` runs, per session of a client new to the table; `full`: the
    table is filled first (twice over, so each new client evicts one)."""
    best = float("inf")
    for _ in range(repeat):
        table, loop, gate = make_gate()
        before = 2 * table.capacity if full else 0
        sessions = [SimpleNamespace(peer=Peer(client_address(n), 40000), client_entry=-1,
                                    end="") for n in range(before + NEW_CLIENTS)]
        run_sessions(table, loop, gate, sessions[:before])
        gate.keys.clear()
        started = time.perf_counter()
        run_sessions(table, loop, gate, sessions[before:])
        best = min(best, (time.perf_counter() - started) / NEW_CLIENTS * 1e6)
        table.close()
    return best


def run_sessions(table: ClientTable, loop: SimpleNamespace, gate: ClientGate,
                 sessions: list[SimpleNamespace]) -> None:
    for n, session in enumerate(sessions, 1):
        gate.admit(session)
        gate.release(session)
        if n % FLUSH_EVERY == 0:
            loop.now += 0.01
            table.flush(loop.now)


def make_gate() -> tuple[ClientTable, SimpleNamespace, ClientGate]:
    table = ClientTable(16384, 1024)
    table.hand_out(0)
    table.hand_out(1)
    loop = SimpleNamespace(now=1000.0)
    gate = ClientGate(PerClient(10**6, 10**9, 10**9), table, 0, loop, WorkerStats(0),
                      "mx.bench")
    return table, loop, gate


def best_us(call, repeat: int = 7) -> float:
    return min(timeit.repeat(call, number=CALLS, repeat=repeat)) / CALLS * 1e6


def main() -> int:
    table, loop, gate = make_gate()
    session = SimpleNamespace(peer=Peer("192.0.2.1", 40000), client_entry=-1, end="")

    def session_cycle() -> None:
        gate.admit(session)
        gate.release(session)

    def flush() -> None:
        table.pending.setdefault(session.client_entry, [key, 1, 1, 0, 0])
        table.flush(loop.now)

    print(f"Python {sys.version.split()[0]}, best of 7 x {CALLS:,} calls")
    print(f"  session admitted and released: {best_us(session_cycle):5.2f} us")
    gate.admit(session)
    key = gate.keys[session.peer.address]
    rcpt = gate.check_recipients(lambda session, event: None, lambda session, reply: None)
    event = RcptTo("rcpt@example.org")
    recipient = best_us(lambda: rcpt(session, event))
    print(f"  recipient counted:             {recipient:5.2f} us")
    print(f"  flush, one client:             {best_us(flush):5.2f} us (at most every 10 ms)")
    print(f"Sessions of new clients, best of 7 x {NEW_CLIENTS:,}, a flush every {FLUSH_EVERY}")
    print(f"  table with room:               {new_clients_us(full=False):5.2f} us")
    print(f"  table full (one evicted each): {new_clients_us(full=True):5.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
