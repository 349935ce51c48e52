"""TLS SMTP load client: N sessions, each a forked process with a blocking socket.

    python bench/tls_client.py --port PORT --mode starttls|implicit|bare [--host 127.0.0.1]
        [--sessions 20] [--messages 2000] [--size 1024] [--line-length 76]
        [--per-connection] [--timeout 120]

Modes:
- starttls: greeting, EHLO, STARTTLS, the handshake, EHLO again, then the messages;
- implicit: the handshake first (RFC 8314), then greeting, EHLO and the messages;
- bare: for bench/bare_tls_server.py, which speaks no SMTP: the handshake, its one-line
  greeting, then every message's bytes (the same body and final ".\\r\\n" an SMTP server
  gets) back to back; then the client closes TLS (close_notify, the server's EOF) and
  reads the byte count the server sends back in the clear.

A message is MAIL FROM, RCPT TO, DATA, the body and its ".\\r\\n", each command waiting for
its reply (no pipelining, like smtp-source). With --per-connection every message gets a
connection of its own and a full handshake; otherwise a session sends its share of the
messages over one connection, then QUIT. The sessions split `--messages` between them.

No handshake is ever resumed: no session is passed in, and the context sets OP_NO_TICKET
(servers may still send TLS 1.3 tickets; they are never used). The server's certificate
is not checked against a CA (the harness makes a throwaway one), which saves the client a
chain verification per handshake; the handshake's signature is still verified.

Sessions are processes, not threads, so that the client's handshakes and encryption use
both cores without a GIL between them; the processes are forked after the message and the
TLS context are built. Prints one JSON object: messages (250 after DATA; bare: messages
whose bytes the server counted), errors, error_samples, seconds (from the first fork to the
last session's end), handshakes, resumed, and the TLS version and cipher of the last
handshake. Exit status 0 only when every message was delivered. Only loopback addresses
are accepted as the target.

Untrusted input: the server's replies, read a line at a time and judged by their codes
(a line too short to hold one is a session error), and the bare server's byte count.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import time

from pipeline_client import in_processes, loopback, print_report  # bench/, beside this

CRLF = b"\r\n"
ENVELOPE = (b"MAIL FROM:<bench@client.bench>\r\n", b"RCPT TO:<sink@server.bench>\r\n")


def make_body(size: int, line_length: int) -> bytes:
    """`size` bytes of message (headers, then lines of `line_length` characters plus CRLF),
    no line starting with "." (nothing to stuff)."""
    head = (b"From: <bench@client.bench>\r\nTo: <sink@server.bench>\r\n"
            b"Subject: TLS benchmark message\r\nMessage-ID: <tls@client.bench>\r\n\r\n")
    line = b"x" * line_length + CRLF
    whole, rest = divmod(max(0, size - len(head)), len(line))
    body = head + line * whole
    if rest:
        body += b"y" * max(0, rest - 2) + CRLF
    return body


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.options |= ssl.OP_NO_TICKET
    return context


class SmtpError(Exception):
    pass


class Replies:
    """SMTP replies read from a blocking socket, one whole (multi-line) reply at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def read(self) -> tuple[int, bytes]:
        lines = []
        while True:
            end = self.buf.find(CRLF)
            while end < 0:
                data = self.sock.recv(65536)
                if not data:
                    raise SmtpError("connection closed by the server")
                self.buf += data
                end = self.buf.find(CRLF)
            line, self.buf = self.buf[:end], self.buf[end + 2:]
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(item[4:] for item in lines)

    def expect(self, code: int, what: str) -> bytes:
        got, text = self.read()
        if got != code:
            raise SmtpError(f"{what}: {got} {text[:120].decode('latin-1')}")
        return text


class Session:
    """One connection: set up per mode, then messages, then QUIT (or, bare, the count)."""

    def __init__(self, args: argparse.Namespace, context: ssl.SSLContext,
                 stats: dict) -> None:
        self.args, self.context, self.stats = args, context, stats
        sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if args.mode != "starttls":
            sock = self._handshake(sock)
        self.sock = sock
        replies = Replies(sock)
        replies.expect(220, "greeting")
        if args.mode == "starttls":
            sock.sendall(b"EHLO client.bench\r\n")
            if b"STARTTLS" not in replies.expect(250, "EHLO").upper():
                raise SmtpError("EHLO reply does not offer STARTTLS")
            sock.sendall(b"STARTTLS\r\n")
            replies.expect(220, "STARTTLS")
            if replies.buf:
                raise SmtpError("bytes after the 220 to STARTTLS")
            self.sock = sock = self._handshake(sock)
            replies = Replies(sock)
        if args.mode != "bare":
            sock.sendall(b"EHLO client.bench\r\n")
            replies.expect(250, "EHLO")
        self.replies = replies
        self.sent_bytes = 0

    def _handshake(self, sock: socket.socket) -> ssl.SSLSocket:
        tls = self.context.wrap_socket(sock)  # connected, so the handshake happens here
        self.stats["handshakes"] += 1
        self.stats["resumed"] += tls.session_reused
        self.stats["tls"] = f"{tls.version()} {tls.cipher()[0]}"
        return tls

    def send_message(self, payload: bytes) -> None:
        if self.args.mode == "bare":
            self.sock.sendall(payload)
            self.sent_bytes += len(payload)
            return
        sock, replies = self.sock, self.replies
        sock.sendall(ENVELOPE[0])
        replies.expect(250, "MAIL")
        sock.sendall(ENVELOPE[1])
        replies.expect(250, "RCPT")
        sock.sendall(b"DATA\r\n")
        replies.expect(354, "DATA")
        sock.sendall(payload)
        replies.expect(250, "end of data")
        self.stats["messages"] += 1

    def close(self, payload_bytes: int) -> None:
        if self.args.mode == "bare":
            # close_notify both ways, then the server's count arrives in the clear.
            plain = self.sock.unwrap()
            counted = b""
            while not counted.endswith(CRLF):
                data = plain.recv(64)
                if not data:
                    break
                counted += data
            plain.close()
            received = int(counted.split()[1]) if counted.startswith(b"250 ") else -1
            if received != self.sent_bytes:
                raise SmtpError(f"bare server counted {received} of {self.sent_bytes} bytes")
            self.stats["messages"] += self.sent_bytes // payload_bytes
            return
        self.sock.sendall(b"QUIT\r\n")
        self.replies.expect(221, "QUIT")
        self.sock.close()


def run_session(args: argparse.Namespace, context: ssl.SSLContext, payload: bytes,
                messages: int) -> dict:
    stats = {"messages": 0, "errors": 0, "error_samples": [], "handshakes": 0,
             "resumed": 0, "tls": ""}
    deadline = time.monotonic() + args.timeout
    try:
        if args.per_connection:
            for _ in range(messages):
                if time.monotonic() > deadline:
                    raise SmtpError("timeout")
                session = Session(args, context, stats)
                session.send_message(payload)
                session.close(len(payload))
        elif messages:
            session = Session(args, context, stats)
            for _ in range(messages):
                if time.monotonic() > deadline:
                    raise SmtpError("timeout")
                session.send_message(payload)
            session.close(len(payload))
    except (OSError, SmtpError, ValueError) as exc:
        stats["errors"] += 1
        stats["error_samples"].append(f"{type(exc).__name__}: {exc}"[:200])
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", type=loopback, default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=("starttls", "implicit", "bare"), required=True)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024, help="message bytes")
    parser.add_argument("--line-length", type=int, default=76,
                        help="characters per body line, CRLF not counted")
    parser.add_argument("--per-connection", action="store_true",
                        help="a new connection (and full handshake) for every message")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if args.messages < 1 or args.sessions < 1:
        parser.error("--messages and --sessions must be >= 1")

    payload = make_body(args.size, args.line_length) + b".\r\n"
    context = client_context()
    sessions = min(args.sessions, args.messages)
    started = time.perf_counter()
    # A process per session: a TLS client's handshakes and records cost about what the
    # server's do, more than one Python process keeps up with.
    parts = in_processes(sessions, sessions, args.messages,
                         lambda _, share: run_session(args, context, payload, share),
                         died={"messages": 0, "errors": 1,
                               "error_samples": ["session process died"],
                               "handshakes": 0, "resumed": 0, "tls": ""})
    seconds = time.perf_counter() - started
    result = {
        "messages": sum(part["messages"] for part in parts),
        "requested": args.messages,
        "sessions": sessions,
        "errors": sum(part["errors"] for part in parts),
        "error_samples": [s for part in parts for s in part["error_samples"]][:5],
        "seconds": seconds,
        "handshakes": sum(part["handshakes"] for part in parts),
        "resumed": sum(part["resumed"] for part in parts),
        "tls": next((part["tls"] for part in parts if part["tls"]), ""),
    }
    return print_report(result)


if __name__ == "__main__":
    sys.exit(main())
