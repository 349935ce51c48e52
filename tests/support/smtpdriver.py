"""A byte-level driver for SmtpServerConnection, in the spirit of h11's `receive_and_get`.

`Client` feeds client bytes in a chosen chunking, answers every decision event through a
policy (accept by default, MessageEnd with queue ids "Q1", "Q2", ...), and records the
events and the reply bytes. No sockets, threads or mocks: bytes in, events and bytes out.

Events are recorded normalized, so that a scenario gives the same list in every chunking:
BodyChunk views are copied at once (they are borrowed from the receive buffer) and runs
of consecutive chunks are merged into one `BodyChunk(bytes)`.

Also here: canned client text with its replies, helpers for scenario tables, and the
slow reference for DATA (byte at a time, CRLF-only lines), shared by the unit, property
and corpus tests.
"""

from __future__ import annotations

import random
import re
from itertools import count
from typing import Callable

from minismtp.smtp import replies
from minismtp.smtp.buffer import ReceiveBuffer
from minismtp.smtp.events import (
    DECISIONS, NEED_DATA, PAUSED, BodyChunk, ConnectionClosed, DataStarted, Hello, MailFrom,
    MessageEnd, MessageRejected,
)
from minismtp.smtp.protocol import Settings, SmtpServerConnection
from minismtp.smtp.replies import Reply

MODES = ("whole", "bytewise", "lines", "random")
HOSTNAME = "mx.test"
HOLD = object()  # a policy answer: leave the decision pending (the core stays PAUSED)

Policy = Callable[[object], object]  # event -> None (accept) | Reply (reject) | HOLD


def split(data: bytes, mode: str, rng: random.Random) -> list[bytes]:
    """Cut `data` the way a network might deliver it."""
    if not data:
        return []
    if mode == "whole":
        return [data]
    if mode == "bytewise":
        return [data[i:i + 1] for i in range(len(data))]
    if mode == "lines":  # after every LF, so CRs and partial lines ride along
        return re.findall(rb"[^\n]*\n|[^\n]+", data)
    if mode == "random":
        k = rng.randint(1, max(1, len(data) // 3))
        cuts = sorted(set(rng.randrange(1, len(data)) for _ in range(k))) if len(data) > 1 else []
        edges = [0, *cuts, len(data)]
        return [data[a:b] for a, b in zip(edges, edges[1:])]
    raise ValueError(f"unknown mode {mode!r}")


def accept_all(event: object) -> None:
    return None


def reject(kind: type, reply: Reply, when: Callable[[object], bool] = lambda e: True) -> Policy:
    """A policy that rejects decisions of `kind` (matching `when`) and accepts the rest."""
    return lambda event: reply if isinstance(event, kind) and when(event) else None


def hold(kind: type) -> Policy:
    return lambda event: HOLD if isinstance(event, kind) else None


class Client:
    """One session against a fresh core; see the module docstring."""

    def __init__(self, mode: str = "whole", *, settings: Settings | None = None,
                 greeting: Reply | None = None, policy: Policy = accept_all, seed: int = 5321,
                 **setting_overrides: object) -> None:
        if settings is None:
            settings = Settings(hostname=HOSTNAME, **setting_overrides)
        self.conn = SmtpServerConnection(settings)
        self.mode = mode
        self.policy = policy
        self.rng = random.Random(seed)
        self.events: list[object] = []
        self.chunks: list[bytes] = []  # raw BodyChunk contents, in order, unmerged
        self.batches: list[bytes] = []  # every non-empty data_to_send(), greeting first
        self.held: object | None = None
        self._backlog = b""  # client bytes not yet fed because a decision is held
        self._queue_ids = (f"Q{n}" for n in count(1))
        self.conn.greet(greeting)
        self._drain()
        self._flush()

    # -- feeding -------------------------------------------------------------------

    def send(self, data: bytes, mode: str | None = None) -> bytes:
        """Feed `data` in the given chunking; return the reply bytes it caused."""
        first = len(self.batches)
        for piece in split(data, mode or self.mode, self.rng):
            self._push(piece)
            self._flush()
        return b"".join(self.batches[first:])

    def send_sized(self, data: bytes, sizes: list[int]) -> bytes:
        """Feed `data` in pieces of the given sizes, used in turn (a chunking to shrink)."""
        first, offset, turn = len(self.batches), 0, 0
        while offset < len(data):
            size = max(1, sizes[turn % len(sizes)])
            self._push(data[offset:offset + size])
            self._flush()
            offset, turn = offset + size, turn + 1
        return b"".join(self.batches[first:])

    def answer(self, reply: Reply | None = None, queue_id: str | None = None) -> bytes:
        """Answer the held decision (accept, or reject with `reply`), then go on."""
        event, self.held = self.held, None
        assert event is not None, "no decision is held"
        first = len(self.batches)
        self._answer(event, reply, queue_id)
        self._drain()
        backlog, self._backlog = self._backlog, b""
        self._push(backlog)
        self._flush()
        return b"".join(self.batches[first:])

    def _push(self, data: bytes) -> None:
        if self.held is not None:
            self._backlog += data
            return
        while data and not self.conn.closed:
            n = self.conn.receive_data(data)
            data = data[n:]
            self._drain()
            if self.held is not None:
                self._backlog += data
                return
            assert n or self.conn.closed, "the core took no bytes although it was drained"

    def _drain(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA or event is PAUSED:
                return
            if isinstance(event, ConnectionClosed):
                if not self.events or not isinstance(self.events[-1], ConnectionClosed):
                    self.events.append(event)
                return
            self._record(event)
            if type(event) in DECISIONS:
                verdict = self.policy(event)
                if verdict is HOLD:
                    self.held = event
                    return
                self._answer(event, verdict)

    def _answer(self, event: object, reply: Reply | None, queue_id: str | None = None) -> None:
        if reply is not None:
            self.conn.reject(reply)
        elif isinstance(event, MessageEnd):
            self.conn.accept(queue_id or next(self._queue_ids))
        else:
            self.conn.accept()

    def _record(self, event: object) -> None:
        if isinstance(event, BodyChunk):
            data = bytes(event.data)  # borrowed: copy before the next call into the core
            assert data, "empty BodyChunk"
            self.chunks.append(data)
            if self.events and isinstance(self.events[-1], BodyChunk):
                self.events[-1] = BodyChunk(self.events[-1].data + data)
            else:
                self.events.append(BodyChunk(data))
        else:
            self.events.append(event)

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.batches.append(out)

    # -- looking at the results ----------------------------------------------------

    @property
    def greeting(self) -> bytes:
        return self.batches[0]

    @property
    def replies(self) -> bytes:
        """Every reply after the greeting."""
        return b"".join(self.batches[1:])

    @property
    def bodies(self) -> list[bytes]:
        """The body delivered for each message, in order (b"" when no chunk came)."""
        found, current = [], None
        for event in self.events:
            if isinstance(event, DataStarted):
                current = b""
            elif isinstance(event, BodyChunk):
                current = (current or b"") + event.data
            elif isinstance(event, (MessageEnd, MessageRejected)):
                found.append(current or b"")
                current = None
        return found

    def of(self, kind: type) -> list[object]:
        return [event for event in self.events if isinstance(event, kind)]


# -- canned client text and the replies it gets -------------------------------------

EHLO = b"EHLO client.example\r\n"
HELO = b"HELO client.example\r\n"
MAIL = b"MAIL FROM:<alice@example.org>\r\n"
RCPT = b"RCPT TO:<bob@mx.test>\r\n"
OPEN = EHLO + MAIL + RCPT + b"DATA\r\n"  # a session up to the start of the body


def ehlo_reply(max_message_bytes: int = Settings().max_message_bytes) -> bytes:
    return replies.ehlo(HOSTNAME, max_message_bytes).wire


def open_reply(max_message_bytes: int = Settings().max_message_bytes) -> bytes:
    return (ehlo_reply(max_message_bytes) + replies.SENDER_OK.wire
            + replies.RECIPIENT_OK.wire + replies.START_INPUT.wire)


def queued(queue_id: str) -> bytes:
    return replies.queued(queue_id).wire


EHLO_R = ehlo_reply()
HELLO = Hello("client.example", extended=True)


def wire(*parts: Reply | bytes) -> bytes:
    return b"".join(p.wire if isinstance(p, Reply) else p for p in parts)


# -- scenario tables for pytest.mark.parametrize("data, expected, events, client", ...) --

def case(name: str, data: bytes, *expected: Reply | bytes, events: list | None = None,
         **client: object) -> object:
    """A scenario: client bytes, the exact replies, optionally the exact events; `client`
    goes to Client() (settings, greeting, policy)."""
    import pytest

    return pytest.param(data, expected, events, client, id=name)


def mail_from(path: bytes, sender: str, **params: object) -> object:
    """EHLO, then MAIL FROM:`path` accepted as `sender` (MailFrom fields in `params`)."""
    event = MailFrom(sender, **{"size": None, "smtputf8": False, "body_8bitmime": False,
                                **params})
    return case(path.decode("utf-8", "replace"), EHLO + b"MAIL FROM:" + path + b"\r\n",
                EHLO_R, replies.SENDER_OK, events=[HELLO, event])


def mail_param(params: bytes, *expected: Reply, **client: object) -> object:
    """EHLO, then MAIL FROM:<alice@example.org> with `params`, answered `expected`."""
    limit = client.get("max_message_bytes", Settings().max_message_bytes)
    data = EHLO + b"MAIL FROM:<alice@example.org> " + params + b"\r\n"
    return case(params.decode(), data, ehlo_reply(limit), *expected, **client)


# -- the slow reference for DATA ----------------------------------------------------

def reference_body(stream: bytes) -> tuple[bytes, int] | None:
    """Unstuff a DATA stream byte by byte: (body, offset just past the terminator).

    Lines end at CRLF only; a line that is exactly "." ends the data; any other line
    loses one leading dot (RFC 5321 4.5.2). None if the stream holds no terminator.
    """
    body, line = bytearray(), bytearray()
    for offset in range(len(stream)):
        line.append(stream[offset])
        if line[-2:] == b"\r\n":
            text = line[:-2]
            if text == b".":
                return bytes(body), offset + 1
            body += text[1:] if text[:1] == b"." else text
            body += b"\r\n"
            line.clear()
    return None


def reference_body_normalized(stream: bytes) -> tuple[bytes, int] | None:
    """`reference_body` under bare_lf "normalize": a line ends at CRLF or at a bare LF
    and is handed on with CRLF; only a "." line between two CRLFs (or first, ended by
    CRLF) ends the data; any other line loses one leading dot."""
    body, line, crlf_before = bytearray(), bytearray(), True
    for offset in range(len(stream)):
        line.append(stream[offset])
        if line[-1:] != b"\n":
            continue
        crlf = line[-2:] == b"\r\n"
        text = line[:-2] if crlf else line[:-1]
        if text == b"." and crlf and crlf_before:
            return bytes(body), offset + 1
        body += (text[1:] if text[:1] == b"." else text) + b"\r\n"
        line.clear()
        crlf_before = crlf
    return None


def stuff_lines(body: bytes) -> bytes:
    """Dot-stuff a body whose lines end in CRLF or bare LF, at every line start (as
    smtplib does: after every LF)."""
    return re.sub(rb"(?m)^\.", b"..", body)


def stuff(body: bytes) -> bytes:
    """Dot-stuff a body of CRLF-terminated lines, as a client does before DATA's end."""
    lines = body.split(b"\r\n")
    return b"\r\n".join(b"." + line if line[:1] == b"." else line for line in lines)


def scan_body_chunks(chunks: list[bytes], capacity: int = 64) -> tuple[list[bytes], bytes] | None:
    """Run BodyScanner over `chunks` through a ReceiveBuffer, as the core does.

    Returns (body pieces, bytes left after the terminator), or None if the data ended
    first. Every piece is checked to be non-empty only where the scanner moved.
    """
    from minismtp.smtp.scanner import BodyScanner  # here, so the core's tests never depend on it

    buf, scanner, pieces = ReceiveBuffer(capacity), BodyScanner(), []
    todo = [c for c in chunks if c]
    while todo:
        chunk = todo.pop(0)
        taken = buf.feed(chunk)
        if taken < len(chunk):
            todo.insert(0, chunk[taken:])
        while True:
            pos = buf.start
            buf.start = scanner.step(buf.data, pos, buf.end)
            piece = (bytes(scanner.copied) if scanner.copied is not None
                     else bytes(buf.data[scanner.start:scanner.stop]))
            if piece:
                pieces.append(piece)
            if scanner.done:
                return pieces, bytes(buf.data[buf.start:buf.end]) + b"".join(todo)
            if buf.start == pos:
                assert not piece
                break
        assert len(buf) <= 4, "the scanner keeps at most a few bytes back"
    return None


def has_bare_lf(body: bytes) -> bool:
    return any(body[i] == 0x0A and (i == 0 or body[i - 1] != 0x0D) for i in range(len(body)))


REPLY_LINE = re.compile(rb"[2-5]\d\d[ -][\x20-\x7e]*\r\n")


def reply_lines(wire: bytes) -> list[bytes]:
    """Split reply bytes into lines, checking each is a well-formed SMTP reply line."""
    lines = re.findall(rb"[^\n]*\n", wire)
    assert b"".join(lines) == wire, wire
    for line in lines:
        assert REPLY_LINE.fullmatch(line), line
    return lines
