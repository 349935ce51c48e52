"""Lockstep SMTP load client, a connection per message, with what a server's edge features
need: a PROXY header first, AUTH PLAIN after EHLO. The S1E and S1B client.

    python bench/session_client.py --port PORT [--host 127.0.0.1] [--sessions 20]
        [--messages 2000] [--size 1024] [--procs 1] [--proxy v1|v2]
        [--auth USER:PASSWORD [--pipeline-auth] | --noop] [--timeout 120]

A session is a connection carrying one message, each command waiting for its reply (no
pipelining, like smtp-source): with --proxy first a PROXY header (version 1 or 2, TCP over
IPv4, as HAProxy's send-proxy and send-proxy-v2 send it: with the connection's first
segment, before the greeting; sent as soon as connect returns if the connection is up
by then, else once it is writable), then the 220 greeting, EHLO, with --auth
`AUTH PLAIN <base64>` (RFC 4954's initial response, answered 235), MAIL FROM, RCPT TO,
DATA, the body and its ".", QUIT and its 221; then the connection is closed and the next
one opened, `--sessions` at a time in one selectors loop, until `--messages` are sent.
Without --proxy and --auth the client does exactly the same otherwise, so a server with
the feature and one without, driven by this client, differ by what the feature costs the
server (and the round trip AUTH adds). With --pipeline-auth, AUTH PLAIN and MAIL FROM go
out in one write and their 235 and 250 are read together: RFC 4954 section 4 lets a
client pipeline AUTH when, as PLAIN with an initial response does, it completes in one
round trip. The session then has the round trips of one without AUTH.

Each PROXY header claims a different client, 198.18.x.y (RFC 2544's benchmarking block)
counting up from 198.18.0.1 (in each client process), so that per-client state on the
server sees many clients.

Prints one JSON object to stdout: messages (250 after DATA), errors, error_samples,
seconds (wall time from the first connect to the last session's end), msgs_per_s,
auths (235 answers), and p50_ms and p99_ms of a session's length (connect to 221).
Exit status 0 only when every message got its 250 and no session failed. Bounded: it
stops after `--timeout` seconds, counting unfinished sessions as errors. Only loopback
addresses are accepted as the target.

Untrusted input: the server's replies, split into lines and judged by their codes.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import os
import selectors
import socket
import struct
import sys
import time

from pipeline_client import (
    Pool, in_processes, load_arguments, make_body, parsed_load_arguments, print_report, summarize,
)

CRLF = b"\r\n"
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_SIZE = 64 * 1024  # the body is sent at once, into the socket's buffer
CLAIMED_BASE = int(ipaddress.IPv4Address("198.18.0.1"))  # RFC 2544, 198.18.0.0/15


_V2_TCP4 = struct.Struct("!4s4sHH")  # source, destination, their ports
_V2_TCP4_HEAD = PROXY_V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", _V2_TCP4.size)
_LOOPBACK = socket.inet_aton("127.0.0.1")


def proxy_header(version: str, index: int, port: int) -> bytes:
    """The PROXY header of connection `index`: TCP over IPv4 from a claimed client to
    127.0.0.1:`port`. Built from bytes, as a balancer does in C: the client must not
    spend on it what the server is measured on (ipaddress objects took 2.7 us)."""
    source = struct.pack("!I", CLAIMED_BASE + index % (1 << 17))
    source_port = 1024 + index % 60000
    if version == "v1":
        return b"PROXY TCP4 %s 127.0.0.1 %d %d\r\n" % (
            socket.inet_ntoa(source).encode(), source_port, port)
    # Version 2, command PROXY (0x21); TCP over IPv4 (0x11); a 12-byte address block.
    return _V2_TCP4_HEAD + _V2_TCP4.pack(source, _LOOPBACK, source_port, port)


def auth_plain(user: str, password: str) -> bytes:
    """AUTH PLAIN with its initial response (RFC 4616: authzid NUL authcid NUL password)."""
    token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
    return b"AUTH PLAIN " + token + CRLF


class Session:
    """One connection, one message. `steps` is what is left to say, each with the reply
    code that must come first: the greeting's 220 before EHLO, and so on (None: nothing
    to say after that reply, the next one is already on its way)."""

    __slots__ = ("sock", "steps", "inbuf", "started", "connecting")

    def __init__(self, sock: socket.socket, steps: list[tuple[bytes, bytes | None]],
                 connecting: bool) -> None:
        self.sock = sock
        self.steps = steps
        self.inbuf = b""
        self.started = time.perf_counter()
        self.connecting = connecting  # waiting to send the PROXY header


MAIL_FROM = b"MAIL FROM:<bench@client.bench>\r\n"


def run(host: str, port: int, sessions: int, messages: int, size: int, timeout: float,
        proxy: str = "", auth: tuple[str, str] | None = None, noop: bool = False,
        pipeline_auth: bool = False) -> dict:
    payload = make_body(size) + b".\r\n"
    head = [(b"220", b"EHLO client.bench\r\n")]
    if auth and pipeline_auth:  # one write; the 235 is awaited with nothing to say
        head += [(b"250", auth_plain(*auth) + MAIL_FROM), (b"235", None)]
    elif auth:
        head += [(b"250", auth_plain(*auth)), (b"235", MAIL_FROM)]
    elif noop:
        head += [(b"250", b"NOOP\r\n"), (b"250", MAIL_FROM)]
    else:
        head.append((b"250", MAIL_FROM))
    script = head + [
        (b"250", b"RCPT TO:<sink@server.bench>\r\n"),
        (b"250", b"DATA\r\n"),
        (b"354", payload),
        (b"250", b"QUIT\r\n"),
        (b"221", b""),
    ]
    pool = Pool(messages)
    sel = selectors.DefaultSelector()
    done = auths = 0
    errors: list[str] = []
    lengths: list[float] = []
    index = 0
    started = time.perf_counter()
    deadline = started + timeout

    def open_one() -> None:
        nonlocal index
        if not pool.take():
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            errors.append(f"connect: {os.strerror(err)}")
            return
        header = proxy_header(proxy, index, port) if proxy else b""
        index += 1
        steps = list(script)
        connecting = False
        if header:
            # Sent at once if the connection is up (on loopback it is by the time
            # connect returns), else once it is writable: the balancer's side of the
            # work stays small beside the server's, which is what is measured.
            try:
                sent = sock.send(header)  # all or nothing: the socket's buffer is empty
            except OSError:
                sent = 0
            if sent != len(header):
                steps.insert(0, (b"", header[sent:]))
                connecting = True
        session = Session(sock, steps, connecting=connecting)
        sel.register(sock, selectors.EVENT_WRITE if connecting else selectors.EVENT_READ,
                     session)

    def close(session: Session, error: str = "") -> None:
        sel.unregister(session.sock)
        session.sock.close()
        if error:
            errors.append(error)  # this slot ends: a failing server is not hammered on
        else:
            lengths.append(time.perf_counter() - session.started)
            open_one()

    def send(session: Session, data: bytes) -> bool:
        try:
            session.sock.sendall(data)  # at most MAX_SIZE: the socket buffer takes it
        except OSError as exc:
            close(session, f"send: {exc}")
            return False
        return True

    for _ in range(min(sessions, messages) or 1):
        open_one()
    while sel.get_map():
        now = time.perf_counter()
        if now > deadline:
            for key in list(sel.get_map().values()):
                close(key.data, "timeout")
            break
        for key, _ in sel.select(timeout=min(1.0, deadline - now)):
            session = key.data
            if session.connecting:  # connected: the PROXY header goes first
                problem = session.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if problem:
                    close(session, f"connect: {os.strerror(problem)}")
                    continue
                session.connecting = False
                if send(session, session.steps.pop(0)[1]):
                    sel.modify(session.sock, selectors.EVENT_READ, session)
                continue
            try:
                data = session.sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError as exc:
                close(session, f"recv: {exc}")
                continue
            if not data:
                close(session, f"closed by the server before {session.steps[0][0].decode()}")
                continue
            buf = session.inbuf + data
            session.inbuf = b""
            while buf:
                end = buf.find(CRLF)
                if end < 0:
                    session.inbuf = buf
                    break
                line, buf = buf[:end], buf[end + 2:]
                if line[3:4] == b"-":  # not the last line of a multi-line reply
                    continue
                expected, say = session.steps.pop(0)
                if line[:3] != expected:
                    close(session, f"{line[:120].decode('latin-1')!r} instead of "
                                   f"{expected.decode()}")
                    break
                if expected == b"235":
                    auths += 1
                if say == b"QUIT\r\n":  # the 250 after the body
                    done += 1
                if say is None:  # a pipelined command's reply comes next
                    continue
                if not say:  # the 221: this session is over
                    close(session)
                    break
                if not send(session, say):
                    break
    seconds = time.perf_counter() - started
    sel.close()
    return {"messages": done, "sessions": sessions, "errors": len(errors),
            "error_samples": errors[:5], "seconds": seconds, "auths": auths,
            "latencies": lengths}


def main(argv: list[str] | None = None) -> int:
    parser = load_arguments(__doc__.splitlines()[0], messages=2000)
    parser.add_argument("--proxy", choices=("v1", "v2"), help="send a PROXY header first")
    parser.add_argument("--auth", metavar="USER:PASSWORD", help="AUTH PLAIN after EHLO")
    parser.add_argument("--noop", action="store_true",
                        help="NOOP after EHLO instead: the round trip AUTH adds, alone")
    parser.add_argument("--pipeline-auth", action="store_true",
                        help="with --auth: AUTH PLAIN and MAIL FROM in one write (RFC 4954 4)")
    args = parsed_load_arguments(parser, argv)
    if args.size > MAX_SIZE:
        parser.error(f"--size: at most {MAX_SIZE} (a message goes out in one send)")
    auth = None
    if args.auth is not None:
        user, colon, password = args.auth.partition(":")
        if not colon or not user:
            parser.error("--auth takes USER:PASSWORD")
        auth = (user, password)
    if args.pipeline_auth and auth is None:
        parser.error("--pipeline-auth needs --auth")

    started = time.perf_counter()
    parts = in_processes(args.procs, args.sessions, args.messages, lambda sessions, messages:
                         run(args.host, args.port, sessions, messages, args.size,
                             args.timeout, args.proxy or "", auth, args.noop,
                             args.pipeline_auth))
    result = summarize(parts, time.perf_counter() - started, args.messages)
    result["auths"] = sum(part.get("auths", 0) for part in parts)
    return print_report(result)


if __name__ == "__main__":
    sys.exit(main())
