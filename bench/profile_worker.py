"""Profile one minismtp worker under a bench scenario's load, in this process.

    python bench/profile_worker.py S1                 # 20,000 messages, top 30 by own time
    python bench/profile_worker.py S3 --messages 20 --sort cumulative
    python bench/profile_worker.py S5 --top 50
    python bench/profile_worker.py S1E --edge proxy     # what a PROXY v2 header costs
    python bench/profile_worker.py S1E --edge limits --no-profile   # for callgrind


A real `Worker` (discard delivery, default limits) runs under cProfile on a listener bound
to 127.0.0.1, while the scenario's client (smtp-source, or bench/pipeline_client.py for
S5) sends to it from a thread; when the client is done the worker is told to stop. Only
the worker is profiled: the client's time and the kernel's show up as the time spent in
socket calls. cProfile roughly triples the cost of each Python call, so read the table for
where time goes, not for how fast it is (that is bench/run.py's job). With --no-profile
the worker runs bare, for an instruction counter to read (bench/instructions.py).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from e2e import KIB, MIB  # noqa: E402
from e2e.clients import pipeline_client, session_client, smtp_source, tls_client  # noqa: E402
from e2e.tlsfiles import make_certificate  # noqa: E402

from minismtp import clientlimits  # noqa: E402
from minismtp.anvil import ClientTable  # noqa: E402
from minismtp.arbiter import bind  # noqa: E402
from minismtp.config import load_config  # noqa: E402
from minismtp.delivery import make_backend  # noqa: E402
from minismtp.heartbeat import HeartbeatBoard  # noqa: E402
from minismtp.stats import StatsBoard  # noqa: E402
from minismtp.tls import server_context  # noqa: E402
from minismtp.worker import Worker  # noqa: E402

# scenario: (message bytes, sessions, keep connections open, default message count)
LOADS = {
    "S1": (KIB, 20, False, 20_000),
    "S2": (KIB, 20, True, 40_000),
    "S3": (10 * MIB, 1, False, 30),
    "S5": (KIB, 20, True, 60_000),
    "S7": (KIB, 20, False, 3_000),  # STARTTLS with a full handshake on every connection
    # S1E's client (bench/session_client.py): plain, or with the edge feature of --edge
    "S1E": (KIB, 20, False, 10_000),
}
_PROXY = {"proxy_protocol": {"version": "v2", "trusted": ["127.0.0.1/32"]}}
_AUTH = {"auth": {"mode": "accept_any", "require": True, "allow_plaintext": True}}
EDGE_LISTENERS = {  # --edge: what the S1E listener takes, as in bench/e2e/servers.py
    "none": {},
    "proxy": _PROXY,
    "auth": _AUTH,
    "auth-pipelined": _AUTH,  # the client sends AUTH PLAIN with MAIL FROM (RFC 4954 4)
    "noop": {},  # the client sends NOOP where AUTH goes: AUTH's command turn, alone
    "limits": {},  # limits.per_client: all from 127.0.0.1, one known client
    "proxy-limits": _PROXY,  # each header claims a new client (session_client.py)
}
PER_CLIENT = {"max_sessions": 100_000, "max_new_sessions_per_minute": 10_000_000,
              "max_recipients_per_minute": 100_000_000}  # set, never reached


SELF_CLIENTS = ("S1E", "S5", "S7")  # scenarios whose client is ours, not smtp-source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=sorted(LOADS))
    parser.add_argument("--messages", type=int, help="messages to send (default by scenario)")
    parser.add_argument("--sort", default="tottime", help="pstats sort key (default tottime)")
    parser.add_argument("--top", type=int, default=30, help="rows to print (default 30)")
    parser.add_argument("--edge", choices=sorted(EDGE_LISTENERS), default="none",
                        help="S1E only: the listener takes a PROXY v2 header, or AUTH; the "
                             "client sends a NOOP (AUTH's command turn); or "
                             "limits.per_client is set")
    parser.add_argument("--no-profile", action="store_true",
                        help="run the worker bare and print only the client's outcome")
    parser.add_argument("--flush-s", type=float,
                        help="limits: share per-client counts this often (default "
                             f"clientlimits.FLUSH_S, {clientlimits.FLUSH_S}s)")
    parser.add_argument("--pin", type=lambda text: tuple(int(c) for c in text.split(",")),
                        metavar="W,C", help="run the worker on CPU W and the client on CPU C")
    args = parser.parse_args()
    size, sessions, keep_open, default_count = LOADS[args.scenario]
    if args.scenario not in SELF_CLIENTS and shutil.which("smtp-source") is None:
        print(f"{args.scenario} needs Postfix's smtp-source, not installed here "
              "(bash bench/setup.sh installs it)", file=sys.stderr)
        return 2
    messages = args.messages or default_count

    overrides = {
        "server.listen": ["127.0.0.1:0"], "delivery.backend": "discard",
        "logging.level": "warning", "limits.max_message_size": 64 * MIB,
    }
    if args.scenario == "S7":
        files = make_certificate(Path(tempfile.mkdtemp(prefix="profile-tls-")))
        overrides["tls.certificates"] = [{"cert": str(files.cert), "key": str(files.key)}]
        overrides["server.listen"] = [{"address": "127.0.0.1:0", "tls": "starttls"}]
    per_client = args.scenario == "S1E" and args.edge.endswith("limits")
    if args.scenario == "S1E":
        overrides["server.listen"] = [{"address": "127.0.0.1:0", **EDGE_LISTENERS[args.edge]}]
    if per_client:
        overrides["limits.per_client"] = PER_CLIENT
        if args.flush_s is not None:
            clientlimits.FLUSH_S = args.flush_s  # the gate reads it at each flush
    config = load_config(overrides=overrides)
    context = server_context(config.tls) if args.scenario == "S7" else None
    entry = config.server.listen[0]
    listener = bind(entry, 4096, reuse_port=False, defer_accept=entry.client_speaks_first)
    port = listener.getsockname()[1]
    backend = make_backend("discard", "", False, "single", config.server.hostname)
    clients = None
    if per_client:  # the table the master would make, this worker in slot 0
        clients = ClientTable(config.limits.per_client.table_size, 1)
        clients.hand_out(0)
    worker = Worker(config, [(listener, config.server.listen[0])], backend, HeartbeatBoard(1), 0,
                    StatsBoard(1, 64), tls_context=context, clients=clients)
    outcome = {}

    worker_clock = time.pthread_getcpuclockid(threading.main_thread().ident)

    def load() -> None:
        try:
            run_client()
        finally:
            os.kill(os.getpid(), signal.SIGQUIT)  # the worker's immediate stop, whatever came

    def run_client() -> None:
        if args.pin:
            os.sched_setaffinity(0, {args.pin[1]})  # this thread, and the client it starts
        time.sleep(0.3)  # let the worker reach its loop
        started = time.perf_counter()
        cpu_before = time.clock_gettime(worker_clock)
        if args.scenario == "S5":
            result = pipeline_client(port, sessions=sessions, size=size, messages=messages)
        elif args.scenario == "S1E":
            result = session_client(
                port, sessions=sessions, size=size, messages=messages,
                proxy="v2" if args.edge.startswith("proxy") else "",
                credentials=("bench", "secret") if args.edge.startswith("auth") else None,
                noop=args.edge == "noop", pipeline_auth=args.edge == "auth-pipelined")
        elif args.scenario == "S7":
            result = tls_client(port, mode="starttls", sessions=sessions, size=size,
                                messages=messages, line_length=78, per_connection=True)
        else:
            result = smtp_source(port, sessions=min(sessions, messages), size=size,
                                 messages=messages, keep_open=keep_open)
        outcome["result"], outcome["seconds"] = result, time.perf_counter() - started
        outcome["worker_cpu_s"] = time.clock_gettime(worker_clock) - cpu_before

    if args.pin:
        os.sched_setaffinity(0, {args.pin[0]})  # the worker's thread: the caller's own
    threading.Thread(target=load, daemon=True).start()
    profile = cProfile.Profile(time.thread_time)  # CPU time: a shared machine preempts
    if not args.no_profile:
        profile.enable()
    try:
        worker.run()
    except SystemExit:
        pass
    profile.disable()

    result, seconds = outcome.get("result"), outcome.get("seconds", 0.0)
    delivered = f"{result.messages:,} delivered" if result is not None else "client failed"
    detail = f" ({result.detail})" if result is not None and result.detail else ""
    print(f"{args.scenario}: {messages:,} messages of {size:,} bytes over {sessions} "
          f"session(s): {delivered} in {seconds:.1f}s"
          f"{'' if args.no_profile else ' under the profiler'}{detail}")
    if args.no_profile and result is not None and result.messages:
        # The worker thread's CPU (user and system) while the client ran, per message.
        print(f"worker_cpu_us_per_msg={outcome['worker_cpu_s'] * 1e6 / result.messages:.3f}")
    if not args.no_profile:
        pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)
    return 0 if result is not None and result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
