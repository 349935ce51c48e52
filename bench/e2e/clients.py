"""The load clients: Postfix's smtp-source, bench/pipeline_client.py, and idle connections.

Untrusted input: the clients' output (smtp-source's -c counter, the pipelining client's
JSON) and, for the idle connections, the servers' greetings, read only up to the first CRLF.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time

from e2e import BENCH, CLIENT_TIMEOUT_S, HOST
from e2e.procfs import raise_nofile
from e2e.servers import find_program


@dataclasses.dataclass
class ClientResult:
    ok: bool
    messages: int  # delivered, as counted by the client
    seconds: float
    client_cpu: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    detail: str = ""


def run_process(command: list[str], timeout: float) -> tuple[int, float, float, str, str]:
    """Run a client: (exit status, wall seconds, its CPU seconds, stdout, stderr)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                preexec_fn=raise_nofile)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (proc.returncode, wall, usage.ru_utime + usage.ru_stime,
                out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def smtp_source(port: int, *, sessions: int, size: int, messages: int,
                keep_open: bool = False) -> ClientResult:
    command = [find_program("smtp-source") or "smtp-source", "-c", "-s", str(sessions),
               "-l", str(size), "-m", str(messages), "-M", "client.bench",
               "-f", "bench@client.bench", "-t", "sink@server.bench"]
    if keep_open:
        command.append("-d")
    command.append(f"{HOST}:{port}")
    status, wall, cpu, out, err = run_process(command, CLIENT_TIMEOUT_S)
    counted = re.findall(r"\d+", out)  # -c: "\r1\r2...N\n"
    done = int(counted[-1]) if counted else 0
    ok = status == 0 and done == messages
    detail = "" if ok else (f"smtp-source exit {status}, counted {done}/{messages}: "
                            f"{err.strip()[-300:]}")
    return ClientResult(ok, done, wall, cpu, detail=detail)


def pipeline_client(port: int, *, sessions: int, size: int, messages: int) -> ClientResult:
    command = [sys.executable, str(BENCH / "pipeline_client.py"), "--host", HOST,
               "--port", str(port), "--sessions", str(sessions), "--size", str(size),
               "--messages", str(messages), "--timeout", str(CLIENT_TIMEOUT_S - 10)]
    status, wall, cpu, out, err = run_process(command, CLIENT_TIMEOUT_S)
    try:
        report = json.loads(out)
    except ValueError:
        return ClientResult(False, 0, wall, cpu, detail=f"pipeline_client exit {status}: "
                                                        f"{err.strip()[-300:]}")
    ok = status == 0 and report["messages"] == messages and not report["errors"]
    detail = "" if ok else (f"pipeline_client exit {status}, {report['messages']}/{messages}"
                            f" delivered, {report['errors']} session errors: "
                            f"{report['error_samples']}")
    if not report.get("pipelining"):
        detail = (detail + "; " if detail else "") + "server did not advertise PIPELINING"
    # Its own wall clock, from the first connect: interpreter start-up is not load.
    return ClientResult(ok, report["messages"], report["seconds"], cpu,
                        p50_ms=report["p50_ms"], p99_ms=report["p99_ms"], detail=detail)


def hold_idle(port: int, count: int, *, timeout: float = 90.0,
              in_flight: int = 500) -> tuple[list[socket.socket], int, str]:
    """Open `count` connections and read each one's greeting; keep them open.

    At most `in_flight` are connecting or awaiting their greeting at once, so the server's
    listen queue is not what is measured. Returns (greeted sockets, failures, note).
    """
    sel = selectors.DefaultSelector()
    greeted: list[socket.socket] = []
    pending: dict[socket.socket, bytes] = {}
    failures, started, deadline = 0, 0, time.monotonic() + timeout
    first_error = ""
    while len(greeted) + failures < count and time.monotonic() < deadline:
        while started < count and len(pending) < in_flight:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex((HOST, port))
            started += 1
            if err not in (0, errno.EINPROGRESS):
                failures += 1
                first_error = first_error or os.strerror(err)
                sock.close()
                continue
            pending[sock] = b""
            sel.register(sock, selectors.EVENT_READ)
        for key, _ in sel.select(timeout=0.5):
            sock = key.fileobj
            try:
                data = sock.recv(512)
            except BlockingIOError:
                continue
            except OSError as exc:
                data, first_error = b"", first_error or str(exc)
            if not data:
                sel.unregister(sock)
                del pending[sock]
                sock.close()
                failures += 1
                first_error = first_error or "closed before the greeting"
                continue
            pending[sock] += data
            if b"\r\n" in pending[sock]:
                sel.unregister(sock)
                reply = pending.pop(sock)
                if reply.startswith(b"220"):
                    greeted.append(sock)
                else:
                    failures += 1
                    first_error = first_error or f"greeting {reply[:60]!r}"
                    sock.close()
    for sock in pending:
        sock.close()
    note = ""
    if len(greeted) < count:
        note = (f"held {len(greeted)} of {count}: {failures} failed, "
                f"{len(pending)} without a greeting after {timeout:.0f}s"
                + (f" (first error: {first_error})" if first_error else ""))
    sel.close()
    return greeted, failures, note
