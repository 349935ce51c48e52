"""A client connection's byte stream, as the worker's loop sees it.

Untrusted input: whatever the client sends or fails to read. A transport only moves
bytes: reads go straight into the core's receive buffer (`recv_into`, no copy), and reply
bytes the socket does not take at once wait in `pending` (output.py keeps it) until the
connection is writable again. The loop never touches a socket itself; it asks the
transport. `PlainTransport` is the TCP socket as it is; a TLS transport offers the same
attributes over an encrypted socket.

`read_into(view)` and `write(data, flags)` behave as a socket's `recv_into` and `send`:
the count of bytes moved (0 read: end of stream), BlockingIOError or InterruptedError when
nothing can move now, another OSError when the connection is broken (the caller closes
the session). For a plain socket they are the socket's own methods, so the calls that
every command makes cost nothing more than before there was a transport.
"""

from __future__ import annotations

import _socket
import socket
from typing import TYPE_CHECKING

from minismtp.loop import READ, WRITE

if TYPE_CHECKING:
    import ssl

    from minismtp.tlstransport import TlsTransport

MSG_MORE = getattr(socket, "MSG_MORE", 0)  # Linux: hold the bytes for what follows
_PEEK_NOW = socket.MSG_PEEK | socket.MSG_DONTWAIT
_DRAIN_READS = 16  # per readiness event while lingering: a flooding client must not hold us


def drain(sock: _socket.socket, not_yet: tuple[type[Exception], ...] = (
        BlockingIOError, InterruptedError)) -> bool:
    """Read and drop what the peer sends, a bounded amount; True once it is done (EOF or
    an error), False while more may come (`not_yet`: nothing to read now)."""
    try:
        for _ in range(_DRAIN_READS):
            if not sock.recv(65536):
                return True
    except not_yet:
        return False
    except (OSError, ValueError):  # ValueError: a socket closed under us
        return True
    return False


def peer_gone(sock: _socket.socket, reset_only: bool = False) -> bool:
    """Whether all the kernel holds of the client is its end of stream or a reset: it
    has left. Bytes still to read (commands it sent before a half-close, QUIT say) mean
    it may still be reading. `reset_only`: an end of stream alone is a client that shut
    its side and may be waiting for an answer; only a reset says it left. A syscall: for
    the end of a fault delay, never per command. Under TLS this peeks beneath OpenSSL
    (the base class's recv): a close_notify is bytes there, so only the FIN or reset
    that follows it counts."""
    try:
        ahead = _socket.socket.recv(sock, 1, _PEEK_NOW)
    except (BlockingIOError, InterruptedError):
        return False  # nothing yet: the client is still there
    except (OSError, ValueError):  # a reset; ValueError: a socket closed under us
        return True
    return not ahead and not reset_only


class PlainTransport:
    __slots__ = ("sock", "pending", "read_into", "write")

    # Bytes received but not yet seen by the loop, or a read to retry without waiting
    # for readability: never for a plain socket (select() sees everything); a TLS
    # transport may hold decrypted bytes select() cannot see, or a read that waited to
    # write.
    has_buffered_input = read_again = False
    read_limit = 1 << 62  # a read takes all the view can hold (a TLS read: one record)
    # What a blocked read or write waits for (tlstransport.py: under TLS either may be
    # either); for a plain socket, always the obvious.
    read_wants, write_wants = READ, WRITE
    write_retry_bytes = 0  # a retried send may be shorter (TLS: tlstransport.py)

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.pending = b""  # reply bytes the connection did not take yet
        self.read_into = sock.recv_into
        self.write = sock.send

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def wants_write(self) -> bool:
        return bool(self.pending)

    def shutdown_write(self) -> bool:
        """Send FIN: we will write no more. False if the connection is already gone."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        return True

    def discard_input(self) -> bool:
        """Read and drop what the client sends; True once it is done (EOF or error)."""
        return drain(self.sock)

    def peer_gone(self, reset_only: bool = False) -> bool:
        """The client has left (end of stream or reset, nothing before it to read)."""
        return peer_gone(self.sock, reset_only)

    def close(self) -> None:
        self.sock.close()

    def start_tls(self, context: ssl.SSLContext) -> TlsTransport:
        """STARTTLS: the same connection under TLS, its handshake to come. This transport
        is finished: its socket is detached (fileno() -1), so unregister it from the
        selector first. The caller guarantees the 220 went out whole (nothing pending)
        and that the core dropped every byte read past the STARTTLS line."""
        from minismtp.tlstransport import TlsTransport

        if self.pending:
            raise RuntimeError("the reply to STARTTLS must be sent before the handshake")
        return TlsTransport.wrap(self.sock, context)

    def refuse(self, wire: bytes) -> None:
        """Best effort: one last reply and close, for a connection never served."""
        try:
            self.sock.send(wire, MSG_MORE)  # with the FIN that close() sends
        except OSError:
            pass
        self.sock.close()
