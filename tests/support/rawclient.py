"""A raw SMTP client: a plain socket speaking bytes, for pipelining, hostile input and
timing tests. Every read takes a deadline."""

from __future__ import annotations

import re
import select
import socket
import time

from support.server import HOST
from support.smtpdriver import stuff

_REPLY_LINE = re.compile(rb"(\d{3})([ -])(.*)")
_QUEUED = re.compile(r"2\.0\.0 Ok: queued as (\S+)")


class Reply:
    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines  # raw lines, CRLF stripped
        self.code = int(lines[-1][:3])

    @property
    def raw(self) -> bytes:
        return b"".join(line + b"\r\n" for line in self.lines)

    @property
    def text(self) -> str:
        return self.lines[-1][4:].decode("ascii", "replace")

    @property
    def queue_id(self) -> str:
        """The queue id of a "250 2.0.0 Ok: queued as ID" reply."""
        m = _QUEUED.fullmatch(self.text)
        assert self.code == 250 and m, f"not a queued reply: {self!r}"
        return m.group(1)

    def __repr__(self) -> str:
        return f"Reply({self.raw!r})"


class RawClient:
    """A plain socket speaking bytes: for pipelining, hostile input and timing tests."""

    @staticmethod
    def stuff(body: bytes) -> bytes:
        """Dot-stuff a CRLF body (RFC 5321 section 4.5.2) and add the terminator."""
        assert body == b"" or body.endswith(b"\r\n"), "a body is whole CRLF lines"
        return stuff(body) + b".\r\n"

    @staticmethod
    def envelope(sender: str, recipients: list[str]) -> bytes:
        """MAIL, RCPT... and DATA as one pipelined block."""
        lines = [f"MAIL FROM:<{sender}>", *(f"RCPT TO:<{r}>" for r in recipients), "DATA"]
        return "".join(line + "\r\n" for line in lines).encode()

    def __init__(self, port: int, host: str = HOST, timeout: float = 10.0,
                 source: str | None = None) -> None:
        """`source`: the local address to connect from (127.0.0.2 and the like)."""
        self.timeout = timeout
        self.sock = socket.create_connection(
            (host, port), timeout=timeout,
            source_address=None if source is None else (source, 0))
        self.buf = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Read once; False on EOF. Raises TimeoutError when `deadline` passes."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete reply in time; have {self.buf!r}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError(f"no complete reply in time; have {self.buf!r}") from None
        except ConnectionResetError:
            chunk = b""
        finally:
            self.sock.settimeout(self.timeout)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def reply(self, timeout: float | None = None) -> Reply:
        """Read reply lines up to and including a final "NNN " line."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        lines: list[bytes] = []
        while True:
            while b"\r\n" not in self.buf:
                if self.eof or not self._fill(deadline):
                    raise ConnectionError(f"connection closed; partial reply {lines!r} "
                                          f"{self.buf!r}")
            line, self.buf = self.buf.split(b"\r\n", 1)
            m = _REPLY_LINE.fullmatch(line)
            assert m, f"malformed reply line {line!r}"
            lines.append(line)
            if m.group(2) == b" ":
                return Reply(lines)

    def replies(self, count: int, timeout: float | None = None) -> list[Reply]:
        return [self.reply(timeout) for _ in range(count)]

    def expect(self, code: int, enhanced: str | None = None, timeout: float | None = None
               ) -> Reply:
        r = self.reply(timeout)
        assert r.code == code, f"expected {code}, got {r!r}"
        if enhanced is not None:
            assert r.text.startswith(enhanced + " "), f"expected {enhanced}, got {r!r}"
        return r

    def cmd(self, line: bytes | str, code: int, enhanced: str | None = None) -> Reply:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.expect(code, enhanced)

    def quiet_for(self, seconds: float) -> bool:
        """True if nothing at all arrives (no bytes, no EOF) for `seconds`."""
        if self.buf:
            return False
        readable, _, _ = select.select([self.sock], [], [], seconds)
        return not readable

    def wait_closed(self, timeout: float = 5.0) -> bytes:
        """Read until EOF; return whatever arrived before it."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            self._fill(deadline)
        data, self.buf = self.buf, b""
        return data

    def send_message(self, body: bytes, sender: str = "sender@example.org",
                     recipients: tuple[str, ...] = ("rcpt@example.org",)) -> Reply:
        """One pipelined transaction (RFC 2920); returns the reply to the body."""
        self.send(self.envelope(sender, list(recipients)))
        self.expect(250, "2.1.0")
        for _ in recipients:
            self.expect(250, "2.1.5")
        self.expect(354)
        self.send(self.stuff(body))
        return self.reply()

    def hello(self, name: str = "client.test") -> Reply:
        self.expect(220)
        return self.cmd(f"EHLO {name}", 250)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
