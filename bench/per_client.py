"""The per-client limits' own calls, in a loop: what a session and a recipient cost.

    python bench/per_client.py            # best of 7 runs of 100,000 calls each

Times a worker's `ClientGate` over a real shared table (anvil.py) made as the master
makes it (1024 worker slots), with two slots handed out and every limit set too high to
refuse: a known client's session admitted and released, a recipient counted, and the
flush of one client's pending counts that a busy worker's loop makes at most every
`clientlimits.FLUSH_S`. In a worker the calls cost more than here, where they find
everything in the CPU's caches: `bench/worker_python.py --per-client` measures them in
place, and `bench/run.py --servers minismtp-discard,minismtp-perclient` end to end.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minismtp.anvil import ClientTable  # noqa: E402
from minismtp.clientlimits import ClientGate, PerClient  # noqa: E402
from minismtp.delivery import Peer  # noqa: E402
from minismtp.stats import WorkerStats  # noqa: E402

CALLS = 100_000


def best_us(call, repeat: int = 7) -> float:
    return min(timeit.repeat(call, number=CALLS, repeat=repeat)) / CALLS * 1e6


def main() -> int:
    table = ClientTable(16384, 1024)
    table.hand_out(0)
    table.hand_out(1)
    loop = SimpleNamespace(now=1000.0)
    gate = ClientGate(PerClient(10**6, 10**9, 10**9), table, 0, loop, WorkerStats(0),
                      "mx.bench")
    session = SimpleNamespace(peer=Peer("192.0.2.1", 40000), client_entry=-1, end="")

    def session_cycle() -> None:
        gate.admit(session)
        gate.release(session)

    def flush() -> None:
        table.pending.setdefault(session.client_entry, [key, 1, 1])
        table.flush(loop.now)

    print(f"Python {sys.version.split()[0]}, best of 7 x {CALLS:,} calls")
    print(f"  session admitted and released: {best_us(session_cycle):5.2f} us")
    gate.admit(session)
    key = gate.keys[session.peer.address]
    recipient = best_us(lambda: gate.recipient_refusal(session))
    print(f"  recipient counted:             {recipient:5.2f} us")
    print(f"  flush, one client:             {best_us(flush):5.2f} us (at most every 10 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
