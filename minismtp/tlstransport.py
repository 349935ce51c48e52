"""A client connection's byte stream over TLS: the transport interface of transport.py.

Untrusted input: every byte the client sends, before and after the handshake: a
ClientHello (or garbage, or an HTTP request) first, then records. OpenSSL parses all of
it; this module only drives it without blocking and maps its outcomes onto the socket
semantics the loop already knows.

Built on `ssl.SSLSocket` (`wrap_socket(..., do_handshake_on_connect=False)`), not on
SSLObject with MemoryBIOs: with a socket OpenSSL reads and writes the file descriptor
itself and decrypts straight into the receive buffer, one Python call per read or
write. BIOs would add a `recv`, a BIO write and a copy per read (and the mirror image
per write) in Python, for nothing the loop needs.

Readiness, precisely. TLS decouples what the caller asked from what the socket needs: a
read may need to write (a record OpenSSL must send first, such as a KeyUpdate answer)
and a write may need to read. So each blocking outcome records what to wait for:

- `handshake()` returns False and sets `handshake_wants` (loop.READ or loop.WRITE):
  select on exactly that, then call `handshake()` again.
- `read_into()` raises BlockingIOError and sets `read_wants`: READ (usual) or WRITE;
  select on it and read again (a read that succeeds sets it back to READ). On WRITE
  select on WRITE alone: the client's unread bytes keep the socket readable, and a
  read before the socket takes our record fails again.
- `write()` raises BlockingIOError and sets `write_wants`: WRITE (usual) or READ. The
  next `write()` must begin with the same bytes (it may be longer: replies queued since
  may follow): OpenSSL has already turned part of them into records. Python sets
  SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER (the bytes may move in memory) but not
  SSL_MODE_ENABLE_PARTIAL_WRITE, so a write takes all of `data` or raises; output.py's
  rule "on BlockingIOError keep the whole batch as `pending`, retry with pending + new
  replies" fits that. A write that sends only part of `pending` (the tarpit's pieces)
  passes at least `write_retry_bytes` of it: the length of the write that blocked.
- `has_buffered_input`: OpenSSL holds decrypted bytes that select() cannot see (a read
  returns at most one record, 16 KiB): read again before waiting for readiness.
  `read_again` says either that or a read that waited to write.

Errors: SSLError after the handshake becomes OSError(EPROTO, "TLS: <reason>"), so the
loop's existing `except OSError` closes the session with a readable reason; the peer's
close (close_notify, or a TCP FIN without it) reads as 0, end of stream.
"""

from __future__ import annotations

import errno
import socket
import ssl

from minismtp.loop import READ, WRITE
from minismtp.transport import drain, peer_gone

__all__ = ["HandshakeFailed", "TlsTransport"]

# While lingering, "nothing to read now" may also be OpenSSL's want-read or want-write.
_RECORD = 16384  # the largest plaintext a TLS record carries
_NOT_YET = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class HandshakeFailed(Exception):
    """The TLS handshake failed; `reason` is short, lower case and from a small set (a
    counter label): "wrong version number", "http request", "no shared cipher",
    "unexpected eof", "connection reset", ... (OpenSSL's reason codes, in words)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# OpenSSL reasons that are one of the counted ones (stats.HANDSHAKE_FAILURES) in other
# words: a proxy's CONNECT is an HTTP request on a TLS port all the same.
_SAME_AS = {"HTTPS_PROXY_REQUEST": "http request"}


def handshake_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLEOFError):
        return "unexpected eof"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason.startswith("UNEXPECTED_EOF"):
            return "unexpected eof"
        if reason in _SAME_AS:
            return _SAME_AS[reason]
        return reason.lower().replace("_", " ") if reason else "tls error"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.errno is not None:
        return (errno.errorcode.get(exc.errno) or "os error").lower()
    return "connection lost"


class TlsTransport:
    """A connected non-blocking socket under TLS; see the module docstring."""

    __slots__ = ("sock", "pending", "handshake_wants", "read_wants", "write_wants",
                 "write_retry_bytes")

    # An SSL read returns at most one record's plaintext (RFC 8446 5.1: 2^14 bytes),
    # however much the socket holds; read_into() goes on after a whole one, but a read
    # may still end at a record's edge with more to come: only a shorter one says the
    # socket may be drained.
    read_limit = _RECORD

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.pending = b""  # reply bytes the connection did not take yet
        self.handshake_wants = READ  # the client speaks first
        self.read_wants = READ
        self.write_wants = WRITE
        # The length of a write that blocked, until one succeeds: OpenSSL refuses a retry
        # shorter than that ("bad length"), having made records of part of it already.
        self.write_retry_bytes = 0

    @classmethod
    def wrap(cls, sock: socket.socket, context: ssl.SSLContext) -> TlsTransport:
        """Take over `sock` (non-blocking, connected) as the server side of a TLS session
        whose handshake is still to come: `handshake()` until it returns True. `sock` is
        detached: its own fileno() becomes -1 (the descriptor is the same)."""
        return cls(context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False))

    def handshake(self) -> bool:
        """Advance the handshake: True once complete; False: select on `handshake_wants`
        and call again. Raises HandshakeFailed (then close)."""
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.handshake_wants = READ
            return False
        except ssl.SSLWantWriteError:
            self.handshake_wants = WRITE
            return False
        except (OSError, ValueError) as exc:  # SSLError is an OSError
            raise HandshakeFailed(handshake_reason(exc)) from exc
        self.handshake_wants = 0
        return True

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_into(self, view: memoryview) -> int:
        """Like recv_into; a read that returns a whole record goes on with the next one
        while the view has room, so a body streaming in passes through the loop, the
        core and the sink once per view rather than once per 16 KiB record. Short reads
        (commands) stop after one record, with no extra call."""
        sslobj = self.sock._sslobj  # what SSLSocket.recv_into calls, two frames down
        size = len(view)
        try:
            if sslobj is None:  # not connected, or unwrapped: as the socket itself says
                return self.sock.recv_into(view)
            n = total = sslobj.read(size, view)
        except ssl.SSLWantReadError:
            self.read_wants = READ
            raise BlockingIOError(errno.EAGAIN, "TLS wants to read") from None
        except ssl.SSLWantWriteError:
            self.read_wants = WRITE
            raise BlockingIOError(errno.EAGAIN, "TLS wants to write") from None
        except ssl.SSLEOFError:
            return 0  # a FIN without close_notify: end of stream (suppress_ragged_eofs)
        except ssl.SSLError as exc:
            raise _broken(exc) from exc
        self.read_wants = READ
        while n >= _RECORD and total < size:
            try:
                n = sslobj.read(size - total, view[total:])
            except ssl.SSLError:  # want-read or anything else: the next read says it
                break
            total += n
        return total

    def write(self, data: bytes | memoryview, flags: int = 0) -> int:
        """Send `data` (flags are for plain sockets: SSLSocket refuses any)."""
        try:
            sent = self.sock.send(data)
        except ssl.SSLWantWriteError:
            self.write_wants = WRITE
            self.write_retry_bytes = len(data)
            raise BlockingIOError(errno.EAGAIN, "TLS wants to write") from None
        except ssl.SSLWantReadError:
            self.write_wants = READ
            self.write_retry_bytes = len(data)
            raise BlockingIOError(errno.EAGAIN, "TLS wants to read") from None
        except ssl.SSLError as exc:
            raise _broken(exc) from exc
        self.write_retry_bytes = 0
        return sent

    @property
    def has_buffered_input(self) -> bool:
        """Decrypted bytes wait inside OpenSSL: read again without selecting."""
        try:
            return self.sock.pending() > 0
        except (OSError, ValueError):
            return False

    @property
    def read_again(self) -> bool:
        """Read without waiting for the socket to be readable: decrypted bytes wait inside
        OpenSSL, or the last read waited to write (once writable, read again)."""
        return self.read_wants is not READ or self.has_buffered_input

    @property
    def wants_write(self) -> bool:
        """Replies wait, or a read is blocked until the socket is writable."""
        return bool(self.pending) or self.read_wants == WRITE

    def _send_close_notify(self) -> None:
        """One SSL_shutdown without waiting for the peer's answer: on a non-blocking
        socket `unwrap()` sends our close_notify, then raises SSLWantReadError instead
        of waiting for the client's."""
        try:
            self.sock.unwrap()
        except (OSError, ValueError):  # want-read (sent), want-write (not sent), gone
            pass

    def shutdown_write(self) -> bool:
        """close_notify, then FIN. False if the connection is already gone. Afterwards
        the socket reads raw (discard_input drops records undecrypted)."""
        self._send_close_notify()
        try:
            self.sock.shutdown(socket.SHUT_WR)  # SSLSocket drops its TLS state here
        except (OSError, ValueError):
            return False
        return True

    def discard_input(self) -> bool:
        """Read and drop what the client sends; True once it is done (EOF or error)."""
        return drain(self.sock, _NOT_YET)

    def peer_gone(self, reset_only: bool = False) -> bool:
        """The client has left: nothing decrypted waits inside OpenSSL, and the socket
        holds only its end of stream or a reset (`reset_only`: a reset)."""
        return not self.has_buffered_input and peer_gone(self.sock, reset_only)

    def close(self) -> None:
        """Best effort close_notify (never waits), then close."""
        self._send_close_notify()
        self.sock.close()

    def refuse(self, wire: bytes) -> None:
        """A connection never served: before a handshake no reply can be read by a TLS
        client, so this only closes."""
        self.sock.close()


def _broken(exc: ssl.SSLError) -> OSError:
    return OSError(errno.EPROTO, f"TLS: {handshake_reason(exc)}")
