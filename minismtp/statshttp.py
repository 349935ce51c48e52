"""A tiny non-blocking HTTP responder for the statistics, run in the master's selector loop.

Untrusted input: HTTP requests from anyone who can reach `stats.listen` (request line,
headers, timing). The master supervises every worker, so nothing here may block it or
let a client grow its memory: the request head is read into a buffer of at most 8 KiB
(431 beyond), every client has a deadline enforced by `expire()`, at most `max_clients`
are open at once, and no client behaviour makes `handle()` raise. Only `GET` is served,
and `HEAD` (every answer to it without a body, errors too), in HTTP/1.x (505 for another
major version); the response is written without blocking, then the connection is closed.
Empty lines before the request line, request bodies and extra bytes are ignored.

Idle connections must not lock a dashboard out (hundreds of them used to fill the table
for 5 s windows). So a client must send its whole request head within
`request_timeout_s`, one address holds at most `max_per_address` connections, and a new
connection that finds either limit reached closes an older one (of its address, or of
all) rather than waiting itself: the oldest that has its whole answer and lingers (below),
else the oldest still waiting for its request, once a last read finds that request not
there or not whole (one that has come is answered instead). Only when every place is taken
by an answer still being written do new connections wait in the listen backlog. A new
connection is read at once: a request already sent with it is answered in the same turn,
before later connections can push it out.

Closing a socket that still has unread input makes the kernel send RST, which can
destroy the response before the client reads it (an oversized request, say). So after
responding we shut down our side and read to EOF first ("lingering close", as Apache
does), within the same deadline. A lingering client has had everything we had to say, so
it is the first to give up its place: otherwise scrapers that connect again as soon as
they have read an answer find their own lingering connections holding every place of
their address, and one local process that never closes could keep the rest out.
"""

from __future__ import annotations

import errno
import logging
import re
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus

from minismtp.stats import Totals
from minismtp.statsformat import (
    JSON_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE, RuleName, json_body, render_prometheus,
)

log = logging.getLogger("minismtp.stats")

GetBody = Callable[[str], tuple[int, str, bytes] | None]

MAX_REQUEST_BYTES = 8192
_RECV_BYTES = 4096
_ACCEPTS_PER_WAKEUP = 16
_LINGER_S = 1.0  # after responding, how long to wait for the client's EOF
_LINGER_BYTES = 65536  # and how much to read and drop meanwhile
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_TEXT = "text/plain; charset=utf-8"  # our own answers: errors
# RFC 9112 section 2.3: HTTP-version = "HTTP/" DIGIT "." DIGIT, case-sensitive. Any 1.x
# is served as 1.1 (RFC 9110 section 2.5: a higher minor version is processed as the
# highest one the recipient implements); other majors get 505.
_HTTP_VERSION = re.compile(rb"HTTP/([0-9])\.[0-9]")


class _Client:
    __slots__ = ("sock", "address", "buf", "out", "accepted", "deadline", "mask", "answered",
                 "lingering", "drained")

    def __init__(self, sock: socket.socket, address: str, accepted: float,
                 deadline: float) -> None:
        self.sock = sock
        self.address = address  # the peer's IP: connections are limited per address
        self.buf = bytearray()
        self.out = memoryview(b"")  # response bytes not yet sent (a view: no copy per send)
        self.accepted = accepted
        self.deadline = deadline
        self.mask = 0
        self.answered = False  # a whole request arrived (it is being answered)
        self.lingering = False  # response sent, our side shut down, waiting for EOF
        self.drained = 0


class StatsHttpServer:
    """Serves GET (and HEAD) requests on a listening socket; `get_body(path)` gives
    (status, content type, body), or None for 404. Owns `sock` and closes it in `close()`.

    Every key this server registers carries `data=self`; the master passes those keys to
    `handle()`, and calls `expire(time.monotonic())` once per loop.
    """

    def __init__(self, sock: socket.socket, get_body: GetBody, *, timeout_s: float = 5.0,
                 request_timeout_s: float = 2.0, max_clients: int = 32,
                 max_per_address: int = 4, clock: Callable[[], float] = time.monotonic) -> None:
        self._sock = sock
        self._get_body = get_body
        self.timeout_s = timeout_s  # for the whole exchange
        self.request_timeout_s = request_timeout_s  # for the request head to arrive
        self.max_clients = max_clients
        self.max_per_address = max_per_address
        self._clock = clock
        self._sel: selectors.BaseSelector | None = None
        self._clients: dict[int, _Client] = {}  # in the order accepted: oldest first
        self._per_address: dict[str, int] = {}
        self._paused = False  # at max_clients: the listener is not registered
        self._closing = False

    def register(self, sel: selectors.BaseSelector) -> None:
        self._sock.setblocking(False)
        self._sel = sel
        sel.register(self._sock, _READ, self)

    def handle(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.fileobj is self._sock:
            self._accept()
            return
        client = self._clients.get(key.fd)
        if client is None or client.sock is not key.fileobj:
            return  # an event for a client closed earlier in this round
        self._serve(client, mask)

    def _serve(self, client: _Client, mask: int) -> None:
        try:
            if client.lingering:
                self._drain(client)
            elif mask & _READ and not client.out:
                self._read(client)
            elif mask & _WRITE:
                self._write(client)
        except (BlockingIOError, InterruptedError):
            pass  # a spurious wakeup: wait for the next event
        except OSError:
            self._drop(client)  # reset by peer and the like: nothing to tell anyone
        except Exception:  # a bug here must not take the master down with it
            log.exception("stats: internal error serving a request")
            self._drop(client)

    def expire(self, now: float) -> None:
        """Close clients past their deadline (idle, slow, or not reading our answer)."""
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            self._drop(client)

    @property
    def sock(self) -> socket.socket:
        return self._sock

    def close_inherited(self) -> None:
        """In a forked worker: close the inherited sockets, touching no selector."""
        for client in self._clients.values():
            client.sock.close()
        self._clients.clear()
        self._per_address.clear()
        self._sock.close()

    def close(self) -> None:
        self._closing = True
        for client in list(self._clients.values()):
            self._drop(client)
        if self._sel is not None and not self._paused:
            self._sel.unregister(self._sock)
        self._sock.close()

    # -- connections ---------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKEUP):
            if len(self._clients) >= self.max_clients and self._first_to_go() is None:
                self._pause()  # every place is writing an answer: wait in the backlog
                return
            try:
                sock, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                log.warning("stats: accept failed: %s", exc.strerror or exc)
                return  # EMFILE and the like: try again on the next wakeup
            sock.setblocking(False)
            address = peer[0] if isinstance(peer, tuple) else str(peer)
            if self._make_room(address):
                self._add(sock, address)
            else:
                sock.close()  # every place of its address is writing an answer

    def _make_room(self, address: str) -> bool:
        """Free a place for a new client from `address`: close the `_first_to_go` client,
        of that address if it has all its places, else of all if the table is full.
        False if each such place is still writing an answer.

        A client waiting for its request may have sent it already: the accepts of this
        turn can come before its read event. So it is read first, as that event would
        read it, and closed only if it is still waiting (nothing or part of a request
        came). Each pass frees a place (the next one returns) or answers a waiting
        client, which never waits again: the passes are bounded by the clients."""
        while True:
            if self._per_address.get(address, 0) >= self.max_per_address:
                leaving = self._first_to_go(address)
            elif len(self._clients) >= self.max_clients:
                leaving = self._first_to_go()
            else:
                return True
            if leaving is None:
                return False
            if not leaving.lingering:
                self._serve(leaving, _READ)  # never raises; may answer or drop it
                if leaving.answered or leaving.sock.fileno() < 0:
                    continue  # answered (no longer waiting), or closed (a place freed)
            self._drop(leaving)

    def _add(self, sock: socket.socket, address: str) -> None:
        now = self._clock()
        client = _Client(sock, address, now, now + min(self.request_timeout_s, self.timeout_s))
        self._clients[sock.fileno()] = client
        self._per_address[address] = self._per_address.get(address, 0) + 1
        self._want(client, _READ)
        self._serve(client, _READ)  # its request may be here already

    def _first_to_go(self, address: str | None = None) -> _Client | None:
        """The client (of `address`, if given) to close for a new one: the oldest that
        lingers with its whole answer sent, else the oldest still waiting for its
        request; None if every one is still being written to."""
        waiting = None
        for client in self._clients.values():  # oldest first
            if address not in (None, client.address):
                continue
            if client.lingering:
                return client
            if waiting is None and not client.answered:
                waiting = client
        return waiting

    def _read(self, client: _Client) -> None:
        data = client.sock.recv(_RECV_BYTES)
        if not data:
            self._drop(client)  # gone before finishing its request
            return
        client.buf += data
        if client.buf[:1] in (b"\r", b"\n"):
            # Empty lines before the request line are ignored (RFC 9112 section 2.2), and
            # a CR alone, since a CRLF may come in two reads. They never pile up.
            client.buf = client.buf.lstrip(b"\r\n")
        end = _head_end(client.buf)
        if end < 0 and len(client.buf) <= MAX_REQUEST_BYTES:
            return  # wait for the rest of the head
        client.answered = True
        client.deadline = client.accepted + self.timeout_s
        if end < 0 or end > MAX_REQUEST_BYTES:
            client.out = memoryview(_response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                              head_only=client.buf.startswith(b"HEAD ")))
        else:
            client.out = memoryview(self._respond(bytes(client.buf[:end])))
        client.buf = bytearray()
        self._write(client)

    def _respond(self, head: bytes) -> bytes:
        lines = head.replace(b"\r\n", b"\n").split(b"\n")
        parts = lines[0].split(b" ")
        head_only = parts[0] == b"HEAD"  # its answer has no body, whatever the status
        version = _HTTP_VERSION.fullmatch(parts[2]) if len(parts) == 3 else None
        if version is None or not parts[0].isalpha() \
                or any(line and b":" not in line for line in lines[1:]):
            return _response(HTTPStatus.BAD_REQUEST, head_only=head_only)
        if version[1] != b"1":  # RFC 9110 section 15.6.6: 505 refuses a major version
            return _response(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, head_only=head_only)
        if parts[0] not in (b"GET", b"HEAD"):
            return _response(HTTPStatus.METHOD_NOT_ALLOWED, extra="Allow: GET, HEAD\r\n")
        status, body, content_type = self._page(parts[1].decode("latin-1"))
        return _response(status, body, content_type, head_only=head_only)

    def _page(self, target: str) -> tuple[HTTPStatus, bytes | None, str]:
        """GET `target`'s answer: (status, body or None for the status's own, type)."""
        if target.startswith(("http://", "https://")):  # absolute form, from proxies
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        if not target.startswith("/"):
            return HTTPStatus.BAD_REQUEST, None, _TEXT
        try:
            found = self._get_body(target.split("?", 1)[0])
        except Exception:  # the master's own bug: answer, log, and keep supervising
            log.exception("stats: cannot produce %r", target)
            return HTTPStatus.INTERNAL_SERVER_ERROR, None, _TEXT
        if found is None:
            return HTTPStatus.NOT_FOUND, None, _TEXT
        status, content_type, body = found
        return HTTPStatus(status), body, content_type

    def _write(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.out)
        except (BlockingIOError, InterruptedError):
            sent = 0  # the socket buffer is full: the rest goes when it is writable
        client.out = client.out[sent:]
        if client.out:
            self._want(client, _WRITE)  # the rest when the client reads
            return
        # All sent: say we are done and wait briefly for the client to close its side.
        client.sock.shutdown(socket.SHUT_WR)
        client.lingering = True
        client.deadline = min(client.deadline, self._clock() + _LINGER_S)
        self._want(client, _READ)

    def _drain(self, client: _Client) -> None:
        data = client.sock.recv(_RECV_BYTES)
        client.drained += len(data)
        if not data or client.drained > _LINGER_BYTES:
            self._drop(client)

    def _pause(self) -> None:
        # At the cap, leave further connections in the kernel's backlog until a client
        # goes (each has a deadline). Answering them 503 and closing would race their
        # request: close with unread input sends RST, which can destroy the answer.
        if self._sel is not None and not self._paused:
            self._sel.unregister(self._sock)
            self._paused = True

    def _resume(self) -> None:
        if self._sel is not None and self._paused and len(self._clients) < self.max_clients:
            self._sel.register(self._sock, _READ, self)
            self._paused = False

    def _want(self, client: _Client, mask: int) -> None:
        assert self._sel is not None, "register() first"
        if client.mask == mask:
            return
        if client.mask:
            self._sel.modify(client.sock, mask, self)
        else:
            self._sel.register(client.sock, mask, self)
        client.mask = mask

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if fd >= 0 and self._clients.get(fd) is client:
            del self._clients[fd]
            left = self._per_address.pop(client.address) - 1
            if left:
                self._per_address[client.address] = left
            if client.mask and self._sel is not None:
                self._sel.unregister(client.sock)
        client.sock.close()
        if not self._closing:
            self._resume()


def _head_end(buf: bytearray) -> int:
    """Length of the request head including its blank line, or -1 if not complete yet."""
    ends = [i + len(mark) for mark in (b"\r\n\r\n", b"\n\n") if (i := buf.find(mark)) >= 0]
    return min(ends) if ends else -1


def _response(status: HTTPStatus, body: bytes | None = None, content_type: str = _TEXT,
              extra: str = "", *, head_only: bool = False) -> bytes:
    """The whole response; `head_only` (HEAD): its head alone, Content-Length and all."""
    if body is None:
        body = f"{status.value} {status.phrase}\n".encode()
    head = (f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


PAGE_MAX_AGE_S = 0.25  # workers publish once a second: a page this old lags little
_PAGES: dict[str, tuple[str, Callable[[Totals, Sequence[RuleName]], bytes]]] = {
    "/metrics": (PROMETHEUS_CONTENT_TYPE, lambda t, n: render_prometheus(t, n).encode()),
    "/stats": (JSON_CONTENT_TYPE, json_body),
}


def pages(current: Callable[[], tuple[Totals, Sequence[RuleName]]],
          shape: Callable[[], object] = lambda: None, *, max_age_s: float = PAGE_MAX_AGE_S,
          clock: Callable[[], float] = time.monotonic) -> GetBody:
    """A `get_body` serving /metrics and /stats from `current()` -> (totals, rule names).

    Rendering reads and sums every worker's slot and formats the lot (about 20 ms with
    512 workers), and a flood of requests must not keep the master from its workers: each
    page, once rendered, is served again for `max_age_s`, unless `shape()` (what names
    the counters: rules, listeners, workers) has changed since, which renders it anew."""
    rendered: dict[str, tuple[float, object, tuple[int, str, bytes]]] = {}

    def get_body(path: str) -> tuple[int, str, bytes] | None:
        page = _PAGES.get(path)
        if page is None:
            return None
        now, key = clock(), shape()
        last = rendered.get(path)
        if last is not None and now - last[0] < max_age_s and last[1] == key:
            return last[2]
        content_type, render = page
        totals, names = current()
        found = 200, content_type, render(totals, names)
        rendered[path] = (now, key, found)
        return found

    return get_body
