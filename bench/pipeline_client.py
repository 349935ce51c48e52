"""Pipelining SMTP load client: N sessions in one selectors loop (optionally several processes).

    python bench/pipeline_client.py --port PORT [--host 127.0.0.1] [--sessions 20]
        [--messages 20000] [--size 1024] [--procs 1] [--timeout 120]

Each session reads the greeting, sends EHLO, then sends every message as one pipelined
group (RFC 2920): MAIL FROM, RCPT TO and DATA in one write, and after the 354 the body,
its final ".\\r\\n" and the next message's MAIL/RCPT/DATA together in one write (the message
content may be the first "command" of a group), so a message costs one round trip. The
end-of-data latency of a message is the time from the write that carried its final ".\\r\\n"
to the parse of its 250 reply. Sessions take messages from a shared count, like
smtp-source, until `--messages` are sent, then QUIT.

Prints one JSON object to stdout: messages (250 after DATA), errors, seconds (wall time
from the first connect to the last session's end), msgs_per_s, p50_ms, p99_ms, max_ms and
pipelining (did every EHLO reply advertise PIPELINING). Exit status 0 only when every
message got its 250 and no session failed. Bounded: it stops after `--timeout` seconds,
counting unfinished sessions as errors.

Only loopback addresses are accepted as the target.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import selectors
import socket
import sys
import time
from typing import Callable

CRLF = b"\r\n"


def make_body(size: int) -> bytes:
    """About `size` bytes of message (headers and 78-character lines), dot-stuffing free."""
    head = (b"From: <bench@client.bench>\r\nTo: <sink@server.bench>\r\n"
            b"Subject: pipelined benchmark message\r\nMessage-ID: <bench@client.bench>\r\n\r\n")
    line = b"x" * 76 + CRLF
    body = bytearray(head)
    while len(body) + len(line) <= size:
        body += line
    if len(body) < size:
        body += b"y" * max(0, size - len(body) - 2) + CRLF
    return bytes(body)


class Pool:
    """Messages left to send, shared by the sessions of one process."""

    def __init__(self, count: int) -> None:
        self.left = count

    def take(self) -> bool:
        if self.left > 0:
            self.left -= 1
            return True
        return False


# Session phases: what the next complete reply answers.
GREETING, EHLO, MAIL, RCPT, DATA, END, QUIT = range(7)
EXPECT = {GREETING: b"220", EHLO: b"250", MAIL: b"250", RCPT: b"250", DATA: b"354",
          END: b"250", QUIT: b"221"}


class Session:
    __slots__ = ("sock", "inbuf", "partial", "outbuf", "expect", "pipelining", "sent_end_at",
                 "latencies", "done", "failed", "error", "pool", "envelope", "payload",
                 "events")

    def __init__(self, sock: socket.socket, pool: Pool, envelope: bytes, payload: bytes,
                 latencies: list[float]) -> None:
        self.sock = sock
        self.inbuf = b""
        self.partial = b""  # earlier lines of a multi-line reply
        self.outbuf = b""
        self.expect: list[int] = [GREETING]  # replies owed by the server, in order
        self.pipelining = False
        self.sent_end_at = 0.0
        self.latencies = latencies
        self.done = 0
        self.failed = False
        self.error = ""
        self.pool = pool
        self.envelope = envelope  # MAIL FROM, RCPT TO, DATA
        self.payload = payload  # body + ".\r\n"
        self.events = selectors.EVENT_READ


def run(host: str, port: int, sessions: int, messages: int, size: int,
        timeout: float) -> dict:
    payload = make_body(size) + b".\r\n"
    envelope = b"MAIL FROM:<bench@client.bench>\r\nRCPT TO:<sink@server.bench>\r\nDATA\r\n"
    pool = Pool(messages)
    latencies: list[float] = []
    sel = selectors.DefaultSelector()
    live: list[Session] = []
    started = time.perf_counter()
    deadline = started + timeout
    for _ in range(min(sessions, messages) or 1):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        session = Session(sock, pool, envelope, payload, latencies)
        live.append(session)
        sel.register(sock, selectors.EVENT_READ, session)

    def send(session: Session, data: bytes) -> None:
        if session.outbuf:
            session.outbuf += data
            return
        try:
            n = session.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as exc:  # reset by the server: seen as a failed session
            fail(session, f"send: {exc}")
            return
        if n < len(data):
            session.outbuf = data[n:]
            session.events = selectors.EVENT_READ | selectors.EVENT_WRITE
            sel.modify(session.sock, session.events, session)

    def fail(session: Session, why: str) -> None:
        session.failed = True
        session.error = why
        finish(session)

    def finish(session: Session) -> None:
        if session not in open_sessions:
            return
        sel.unregister(session.sock)
        session.sock.close()
        open_sessions.discard(session)

    def on_reply(session: Session, code: bytes, text: bytes, now: float) -> None:
        phase = session.expect.pop(0)
        if code != EXPECT[phase]:
            fail(session, f"phase {phase}: {(code + text).decode('latin-1')[:200]}")
            return
        if phase == GREETING:
            session.expect.append(EHLO)
            send(session, b"EHLO client.bench\r\n")
        elif phase == EHLO:
            session.pipelining = b"PIPELINING" in text.upper()
            if session.pool.take():
                session.expect += (MAIL, RCPT, DATA)
                send(session, session.envelope)
            else:
                session.expect.append(QUIT)
                send(session, b"QUIT\r\n")
        elif phase == DATA:  # 354: the body, its end, and the next group if there is one
            if session.pool.take():
                session.expect += (END, MAIL, RCPT, DATA)
                out = session.payload + session.envelope
            else:
                session.expect += (END, QUIT)
                out = session.payload + b"QUIT\r\n"
            send(session, out)
            if session.failed:
                return
            if not session.outbuf:
                session.sent_end_at = time.perf_counter()
            else:
                session.sent_end_at = -1.0  # stamped when the write completes
        elif phase == END:
            session.latencies.append(now - session.sent_end_at)
            session.done += 1
        elif phase == QUIT:
            finish(session)

    open_sessions = set(live)
    while open_sessions:
        now = time.perf_counter()
        if now > deadline:
            for session in list(open_sessions):
                fail(session, "timeout")
            break
        for key, mask in sel.select(timeout=min(1.0, deadline - now)):
            session = key.data
            if mask & selectors.EVENT_WRITE and session.outbuf:
                try:
                    n = session.sock.send(session.outbuf)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    fail(session, f"send: {exc}")
                    continue
                session.outbuf = session.outbuf[n:]
                if not session.outbuf:
                    if session.sent_end_at < 0:
                        session.sent_end_at = time.perf_counter()
                    session.events = selectors.EVENT_READ
                    sel.modify(session.sock, session.events, session)
            if not mask & selectors.EVENT_READ or session not in open_sessions:
                continue
            try:
                data = session.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                fail(session, f"recv: {exc}")
                continue
            if not data:
                fail(session, "connection closed by the server" if session.expect
                     else "closed")
                continue
            now = time.perf_counter()
            buf = session.inbuf + data
            start = 0
            while session in open_sessions:
                end = buf.find(CRLF, start)
                if end < 0:
                    break
                line = buf[start:end]
                start = end + 2
                if line[3:4] == b"-":  # not the last line of a multi-line reply
                    session.partial += line[4:] + b"\n"
                    continue
                text, session.partial = session.partial + line[4:], b""
                on_reply(session, line[:3], text, now)
            session.inbuf = buf[start:]
    seconds = time.perf_counter() - started
    sel.close()
    errors = [s.error for s in live if s.failed]
    return {
        "messages": sum(s.done for s in live),
        "requested": messages,
        "sessions": len(live),
        "errors": len(errors),
        "error_samples": errors[:5],
        "seconds": seconds,
        "latencies": latencies,
        "pipelining": all(s.pipelining for s in live if not s.failed) and not all(
            s.failed for s in live),
    }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarize(parts: list[dict], seconds: float, requested: int) -> dict:
    """What the load clients here report of their parts: messages, errors, the rate and
    the latencies."""
    messages = sum(part["messages"] for part in parts)
    ms = [x * 1000 for part in parts for x in part["latencies"]]
    return {
        "messages": messages,
        "requested": requested,
        "sessions": sum(part["sessions"] for part in parts),
        "errors": sum(part["errors"] for part in parts),
        "error_samples": [e for part in parts for e in part["error_samples"]][:5],
        "seconds": seconds,
        "msgs_per_s": messages / seconds if seconds > 0 else 0.0,
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else None,
    }


def print_report(result: dict) -> int:
    """The report as one JSON line; the exit status: 0 when every message went through."""
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if result["errors"] == 0 and result["messages"] == result["requested"] else 1


_DIED = {"messages": 0, "sessions": 0, "errors": 1, "error_samples": ["child died"],
         "latencies": [], "pipelining": False}


def in_processes(procs: int, sessions: int, messages: int,
                 run_part: Callable[[int, int], dict], died: dict = _DIED) -> list[dict]:
    """`run_part(sessions, messages)` in this process, or split over `procs` forked ones
    (sessions and messages shared out evenly); each part's dict, as JSON would give it
    back. A child that dies without answering counts as `died` (one failed session)."""
    procs = min(procs, sessions)
    if procs == 1:
        return [run_part(sessions, messages)]
    readers = []
    for i in range(procs):
        mine = (sessions // procs + (i < sessions % procs),
                messages // procs + (i < messages % procs))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                part = run_part(*mine)
                with os.fdopen(w, "w") as out:
                    json.dump(part, out)
            finally:
                os._exit(0)
        os.close(w)
        readers.append((pid, r))
    parts = []
    for pid, r in readers:
        with os.fdopen(r) as inp:
            text = inp.read()
        os.waitpid(pid, 0)  # reaped, so its CPU time counts in ours (wait4 of the parent)
        parts.append(json.loads(text) if text else dict(died))
    return parts


def loopback(host: str) -> str:
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"only loopback addresses are allowed, got {host!r}")


def load_arguments(description: str, messages: int) -> argparse.ArgumentParser:
    """The options every load client here takes: where, how many, how big, in how many
    processes, for how long."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", type=loopback, default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=messages)
    parser.add_argument("--size", type=int, default=1024, help="message bytes (about)")
    parser.add_argument("--procs", type=int, default=1, help="client processes")
    parser.add_argument("--timeout", type=float, default=120.0)
    return parser


def parsed_load_arguments(parser: argparse.ArgumentParser,
                          argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.messages < 1 or args.sessions < 1 or args.procs < 1:
        parser.error("--messages, --sessions and --procs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = load_arguments(__doc__.splitlines()[0], messages=20000)
    args = parsed_load_arguments(parser, argv)

    started = time.perf_counter()
    parts = in_processes(args.procs, args.sessions, args.messages, lambda sessions, messages:
                         run(args.host, args.port, sessions, messages, args.size, args.timeout))
    result = summarize(parts, time.perf_counter() - started, args.messages)
    result["pipelining"] = all(part["pipelining"] for part in parts)
    return print_report(result)


if __name__ == "__main__":
    sys.exit(main())
