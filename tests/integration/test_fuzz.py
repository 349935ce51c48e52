"""A seeded fuzz run of a live server: mutated sessions, then a check that nothing broke.

Sessions of the corpus (tests/sessions/*.in and a few more below) are mutated at the
line and byte level, sent pipelined and cut at random points, many at once, to a real
`minismtp serve` with 2 workers. Every reply line must be one the server may send
(never client text), after each batch well-formed sessions must get exactly the expected
replies and have their message stored byte for byte, and the workers must be the same
processes at the end. Everything is bounded: session count, bytes per session, and a
deadline for each session and for the run.
"""

from __future__ import annotations

import collections
import errno
import random
import re
import selectors
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from support.smtpdriver import stuff

from minismtp.smtp import replies
from minismtp.smtp.replies import Reply

SEED = 5321
BATCHES = 6
SESSIONS_PER_BATCH = 500
CONCURRENT = 40
MAX_SESSION_BYTES = 6000
SESSION_DEADLINE_S = 15.0
RUN_DEADLINE_S = 120.0  # a hang fails here; a normal run takes a small part of it
CHECKS_PER_BATCH = 4

SESSIONS_DIR = Path(__file__).resolve().parents[1] / "sessions"
EXTRA_SESSIONS = [
    b"EHLO a.example\r\nMAIL FROM:<s@a.example> SIZE=40 BODY=8BITMIME\r\n"
    b"RCPT TO:<r@b.example>\r\nRCPT TO:<postmaster>\r\nDATA\r\n"
    b"Subject: x\r\n\r\n..dot\r\n\xc3\xa9\r\n.\r\nRSET\r\nMAIL FROM:<>\r\n"
    b"RCPT TO:<@relay.example:r@b.example>\r\nDATA\r\nbody\r\n.\r\nQUIT\r\n",
    b"HELO a.example\r\nVRFY someone\r\nHELP\r\nNOOP\r\nMAIL FROM:<s@a.example>\r\n"
    b"RCPT TO:<\"quoted local\"@b.example>\r\nDATA\r\n.\r\nQUIT\r\n",
    "EHLO \u00e9.example\r\nMAIL FROM:<j\u00f6rg@a.example> SMTPUTF8\r\n"
    "RCPT TO:<\u00fc@b.example>\r\nDATA\r\n\u00e9\r\n.\r\nQUIT\r\n".encode(),
]
INSERTS = [b"\r\n", b"\n", b"\r", b".", b"\r\n.\r\n", b"\n.\n", b"\x00", b"\xff", b" ",
           b":", b"<", b">", b"@", b"DATA\r\n", b"RSET\r\n", b"QUIT\r\n", b"A" * 600,
           b"\r\n.", b"%s", b"\x1b[0m", "\u2028".encode()]

_REPLY_LINE = re.compile(rb"[2-5][0-9]{2}[ -][\x20-\x7e]*\r\n")
_QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9]+\.M[0-9]+P[0-9]+Q[0-9]+)\r\n")


def corpus() -> list[bytes]:
    return [path.read_bytes() for path in sorted(SESSIONS_DIR.glob("*.in"))] + EXTRA_SESSIONS


def mutate(rng: random.Random, sessions: list[bytes]) -> bytes:
    """A session with a few line- and byte-level changes, at most MAX_SESSION_BYTES."""
    lines = rng.choice(sessions).split(b"\r\n")
    for _ in range(rng.randint(0, 4)):
        i = rng.randrange(len(lines))
        op = rng.randrange(5)
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[i])
        elif op == 2:
            lines.insert(i, rng.choice(rng.choice(sessions).split(b"\r\n")))
        elif op == 3:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines[i] = lines[i].swapcase() if rng.random() < 0.5 else lines[i].upper()
        if not lines:
            lines = [b""]
    data = bytearray(b"\r\n".join(lines))
    for _ in range(rng.randint(0, 6)):
        at = rng.randrange(len(data) + 1)
        op = rng.randrange(4)
        if op == 0:
            data[at:at] = rng.choice(INSERTS)
        elif op == 1:
            del data[at:at + rng.randint(1, 8)]
        elif op == 2 and at < len(data):
            data[at] = rng.randrange(256)
        else:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
    return bytes(data[:MAX_SESSION_BYTES])


def cut(rng: random.Random, data: bytes) -> list[bytes]:
    """Pipelined as a whole, or cut at random points (one byte apart at the most)."""
    if len(data) < 2 or rng.random() < 0.3:
        return [data] if data else []
    points = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12))))
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


@dataclass
class Exchange:
    """One client connection: bytes to send in pieces, everything the server said."""

    sock: socket.socket
    pieces: list[bytes]
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    reset: bool = False


def run_sessions(port: int, inputs: list[list[bytes]]) -> list[Exchange]:
    """Run every session to the server's close, CONCURRENT at a time; after its last
    piece a client shuts down its side, so the server always sees an end."""
    sel = selectors.DefaultSelector()
    todo = list(reversed(inputs))
    done: list[Exchange] = []
    live = 0

    def start() -> None:
        nonlocal live
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        ex = Exchange(sock, list(todo.pop()), time.monotonic() + SESSION_DEADLINE_S)
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, ex)
        live += 1

    def finish(ex: Exchange) -> None:
        nonlocal live
        sel.unregister(ex.sock)
        ex.sock.close()
        done.append(ex)
        live -= 1

    try:
        while todo or live:
            while todo and live < CONCURRENT:
                start()
            for key, mask in sel.select(0.5):
                ex: Exchange = key.data
                if mask & selectors.EVENT_READ:
                    try:
                        chunk = ex.sock.recv(65536)
                    except BlockingIOError:
                        chunk = None
                    except ConnectionResetError:
                        ex.reset, chunk = True, b""
                    if chunk == b"":
                        finish(ex)
                        continue
                    if chunk:
                        ex.received += chunk
                if mask & selectors.EVENT_WRITE:
                    send_next(ex, sel)
            now = time.monotonic()
            for key in list(sel.get_map().values()):
                assert key.data.deadline > now, (
                    f"a session got no end from the server in {SESSION_DEADLINE_S}s "
                    f"(seed {SEED}); it said {bytes(key.data.received)[-300:]!r}")
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()
    return done


class NotConnectedError(OSError):
    """ENOTCONN from shutdown(): the server closed and the connection is already gone."""


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise NotConnectedError(exc.errno, exc.strerror) from exc
        raise


def send_next(ex: Exchange, sel: selectors.BaseSelector) -> None:
    try:
        if ex.pieces:
            piece = ex.pieces[0]
            sent = ex.sock.send(piece)
            if sent < len(piece):
                ex.pieces[0] = piece[sent:]
                return
            ex.pieces.pop(0)
        if not ex.pieces:
            _shutdown_write(ex.sock)
            sel.modify(ex.sock, selectors.EVENT_READ, ex)
    except BlockingIOError:
        pass
    except (BrokenPipeError, ConnectionResetError, NotConnectedError):
        ex.pieces.clear()  # the server closed (QUIT, 421): read what it said
        sel.modify(ex.sock, selectors.EVENT_READ, ex)


def allowed_lines(hostname: str) -> set[bytes]:
    """Every reply line the server may send in this configuration."""
    values = [v for v in vars(replies).values() if isinstance(v, Reply)]
    values += [replies.greeting(hostname), replies.helo(hostname),
               replies.ehlo(hostname, 32 * 1024 * 1024)]
    return {line + b"\r\n" for reply in values for line in reply.wire.split(b"\r\n") if line}


def check_replies(ex: Exchange, allowed: set[bytes]) -> None:
    data = bytes(ex.received)
    end = data.rfind(b"\r\n") + 2
    assert end == len(data) or ex.reset, f"reply cut short: {data[-200:]!r} (seed {SEED})"
    for line in data[:end].splitlines(keepends=True):
        assert _REPLY_LINE.fullmatch(line), f"malformed reply line {line!r} (seed {SEED})"
        assert line in allowed or _QUEUED.fullmatch(line), (
            f"reply line not from replies.py (client text?): {line!r} (seed {SEED})")


def well_formed(rng: random.Random, n: int) -> tuple[bytes, bytes]:
    """A valid pipelined session and its message body (dots, 8-bit bytes, long lines)."""
    lines = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
             .replace(b"\r", b"").replace(b"\n", b"") for _ in range(rng.randint(1, 30))]
    lines[0] = b".starts with a dot %d" % n
    body = b"Subject: check %d\r\n\r\n" % n + b"".join(line + b"\r\n" for line in lines)
    session = (b"EHLO check.example\r\nMAIL FROM:<check@a.example> BODY=8BITMIME\r\n"
               b"RCPT TO:<r%d@b.example>\r\nDATA\r\n" % n) + stuff(body) + b".\r\nQUIT\r\n"
    return session, body


def test_fuzzed_sessions_leave_the_server_in_sync(make_server):
    # bare_lf reject: a body with a bare LF is the way a mutation reaches the 550 refusal.
    server = make_server({"delivery": {"fsync": False}, "logging": {"level": "warning"},
                          "limits": {"bare_lf": "reject"}})
    workers = sorted(server.worker_pids())
    assert len(workers) == 2
    rng = random.Random(SEED)
    sessions = corpus()
    allowed = allowed_lines(server.hostname)
    greeting = replies.greeting(server.hostname).wire
    ehlo = replies.ehlo(server.hostname, 32 * 1024 * 1024).wire
    expected_head = greeting + ehlo + replies.SENDER_OK.wire + replies.RECIPIENT_OK.wire + (
        replies.START_INPUT.wire)
    started = time.monotonic()
    checked = 0
    seen: collections.Counter[bytes] = collections.Counter()  # reply codes to fuzzed input
    for batch in range(BATCHES):
        fuzzed = [cut(rng, mutate(rng, sessions)) for _ in range(SESSIONS_PER_BATCH)]
        for ex in run_sessions(server.port, fuzzed):
            check_replies(ex, allowed)
            seen.update(line[:3] for line in bytes(ex.received).splitlines())
        checks = [well_formed(rng, batch * CHECKS_PER_BATCH + i) for i in range(CHECKS_PER_BATCH)]
        results = run_sessions(server.port, [cut(rng, session) for session, _ in checks])
        stored = dict(server.maildir_messages())
        for ex in results:
            data = bytes(ex.received)
            assert data.startswith(expected_head), (data, SEED)
            m = _QUEUED.match(data, len(expected_head))
            assert m and data[m.end():] == replies.CLOSING.wire, (data, SEED)
            [key] = [k for k in stored if k.startswith(m.group(1).decode() + ".")]
            message = stored[key]
            n = int(re.search(rb"\nDelivered-To: r(\d+)@b\.example\n", message)[1])
            body = server.stored_form(checks[n - batch * CHECKS_PER_BATCH][1])
            assert message.endswith(body), (key, SEED)  # byte for byte, dots unstuffed
            trace = message[:-len(body)].split(b"\n")
            assert trace[0] == b"Return-Path: <check@a.example>" and trace[-1] == b""
            assert all(line.startswith((b"Delivered-To: ", b"Received: ", b"\t"))
                       for line in trace[1:-1]), (trace, SEED)
            checked += 1
        assert time.monotonic() - started < RUN_DEADLINE_S, "the fuzz run is far too slow"
    assert checked == BATCHES * CHECKS_PER_BATCH
    # The mutations reach every stage: bodies stored and refused, errors up to the 421.
    for code in (b"354", b"250", b"421", b"500", b"501", b"503", b"550", b"221"):
        assert seen[code] > 0, (code, seen)
    assert sorted(server.worker_pids()) == workers  # no worker died or was replaced
    assert "Traceback" not in server.log_text()
