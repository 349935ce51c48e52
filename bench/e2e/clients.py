"""The load clients: Postfix's smtp-source, bench/pipeline_client.py, bench/tls_client.py,
bench/session_client.py, and idle connections (plain, or TLS after STARTTLS).

Untrusted input: the clients' output (smtp-source's -c counter, the other clients' JSON)
and, for the idle connections, the servers' replies, read only up to the end of a reply.
"""

from __future__ import annotations

import dataclasses
import errno
import concurrent.futures
import json
import os
import re
import selectors
import socket
import ssl
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
    tls: str = ""  # tls_client: version and cipher negotiated
    handshakes: int = 0


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


def _json_client(script: str, port: int, *, sessions: int, size: int, messages: int,
                 extra: tuple[str, ...] = (), counted: tuple[tuple[str, str], ...] = ()
                 ) -> tuple[bool, str, float, dict] | ClientResult:
    """Run one of bench/'s Python load clients, which print a JSON report: (whether it
    delivered all `messages` cleanly, the detail to report when it did not, its CPU
    seconds, the report), or a failed ClientResult when it printed none. `counted`:
    (report key, name) of more counts the detail names, before the session errors."""
    command = [sys.executable, str(BENCH / script), "--host", HOST, "--port", str(port),
               "--sessions", str(sessions), "--size", str(size), "--messages", str(messages),
               "--timeout", str(CLIENT_TIMEOUT_S - 10), *extra]
    status, wall, cpu, out, err = run_process(command, CLIENT_TIMEOUT_S)
    name = script.removesuffix(".py")
    try:
        report = json.loads(out)
    except ValueError:
        return ClientResult(False, 0, wall, cpu, detail=f"{name} exit {status}: "
                                                        f"{err.strip()[-300:]}")
    ok = status == 0 and report["messages"] == messages and not report["errors"]
    also = "".join(f"{report[key]} {label}, " for key, label in counted)
    failure = (f"{name} exit {status}, {report['messages']}/{messages} delivered, {also}"
               f"{report['errors']} session errors: {report['error_samples']}")
    return ok, failure, cpu, report


def pipeline_client(port: int, *, sessions: int, size: int, messages: int) -> ClientResult:
    ran = _json_client("pipeline_client.py", port, sessions=sessions, size=size,
                       messages=messages)
    if isinstance(ran, ClientResult):
        return ran
    ok, failure, cpu, report = ran
    detail = "" if ok else failure
    if not report.get("pipelining"):
        detail = (detail + "; " if detail else "") + "server did not advertise PIPELINING"
    # Its own wall clock, from the first connect: interpreter start-up is not load.
    return ClientResult(ok, report["messages"], report["seconds"], cpu,
                        p50_ms=report["p50_ms"], p99_ms=report["p99_ms"], detail=detail)


def session_client(port: int, *, sessions: int, size: int, messages: int, proxy: str = "",
                   credentials: tuple[str, str] | None = None,
                   noop: bool = False, pipeline_auth: bool = False) -> ClientResult:
    """A connection per message, lockstep; a PROXY header first with `proxy`, AUTH PLAIN
    after EHLO with `credentials` (user, password), or with `noop` a NOOP there. With
    `pipeline_auth`, AUTH PLAIN goes out with MAIL FROM (RFC 4954 4)."""
    extra = (("--proxy", proxy) if proxy else ()) + (
        ("--auth", ":".join(credentials)) if credentials else ()) + (
        ("--noop",) if noop else ()) + (("--pipeline-auth",) if pipeline_auth else ())
    ran = _json_client("session_client.py", port, sessions=sessions, size=size,
                       messages=messages, extra=extra, counted=(("auths", "AUTHs"),))
    if isinstance(ran, ClientResult):
        return ran
    ok, failure, cpu, report = ran
    if credentials and report["auths"] != report["messages"]:
        ok = False  # every delivered message must have come after a 235
    detail = "" if ok else failure
    # Its own wall clock, from the first connect: interpreter start-up is not load.
    return ClientResult(ok, report["messages"], report["seconds"], cpu,
                        p50_ms=report["p50_ms"], p99_ms=report["p99_ms"], detail=detail)


def tls_client(port: int, *, mode: str, sessions: int, size: int, messages: int,
               line_length: int, per_connection: bool) -> ClientResult:
    extra = ("--mode", mode, "--line-length", str(line_length)) + (
        ("--per-connection",) if per_connection else ())
    ran = _json_client("tls_client.py", port, sessions=sessions, size=size,
                       messages=messages, extra=extra)
    if isinstance(ran, ClientResult):
        return ran
    ok, failure, cpu, report = ran
    detail = "" if ok else failure
    if report.get("resumed"):  # every handshake must be a full one
        ok = False
        detail = (detail + "; " if detail else "") + f"{report['resumed']} handshakes resumed"
    # Its own wall clock, from the first session's start: interpreter start-up is not load.
    return ClientResult(ok, report["messages"], report["seconds"], cpu, detail=detail,
                        tls=report.get("tls", ""), handshakes=report.get("handshakes", 0))


def _reply(sock: socket.socket, code: bytes) -> bytes:
    """One whole reply (blocking); ValueError unless its code is `code`."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise ValueError("closed by the server")
        data += chunk
        last = data.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
        if data.endswith(b"\r\n") and last[3:4] != b"-":
            break
    if not data.startswith(code):
        raise ValueError(f"{data[:60]!r} instead of {code.decode()}")
    return data


def _open_tls(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    """Connect, EHLO, STARTTLS, handshake; the session is then left idle."""
    sock = socket.create_connection((HOST, port), timeout=30)
    try:
        _reply(sock, b"220")
        sock.sendall(b"EHLO idle.bench\r\n")
        _reply(sock, b"250")
        sock.sendall(b"STARTTLS\r\n")
        _reply(sock, b"220")
        return context.wrap_socket(sock)
    except BaseException:
        sock.close()
        raise


def hold_idle_tls(port: int, count: int, *, timeout: float = 180.0,
                  in_flight: int = 16) -> tuple[list[socket.socket], int, str]:
    """Open `count` connections, each through STARTTLS and a full handshake, and keep them.

    Blocking, `in_flight` at a time on threads (a handshake is a few round trips; the
    harness's CPU is not measured here). Returns (sockets after the handshake, failures,
    note), as hold_idle does.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.options |= ssl.OP_NO_TICKET
    held: list[socket.socket] = []
    errors: list[str] = []
    deadline = time.monotonic() + timeout

    def one(_: int) -> None:
        if time.monotonic() > deadline:
            errors.append("timeout")
            return
        try:
            held.append(_open_tls(port, context))
        except (OSError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(one, range(count)))
    note = ""
    if len(held) < count:
        note = (f"held {len(held)} of {count}: {len(errors)} failed"
                + (f" (first error: {errors[0]})" if errors else ""))
    return held, len(errors), note


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
