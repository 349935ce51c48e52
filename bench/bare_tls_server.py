"""The bare TLS loop S8 measures servers against: decrypt and count, nothing else.

    python bench/bare_tls_server.py --cert CERT --key KEY [--host 127.0.0.1] [--port 0]

One process, one connection at a time, blocking. Each connection: the TLS handshake, a
one-line greeting ("220 bare-tls", so the harness's check that a server is up works the
same), then `recv_into` a 256 KiB buffer until the client's close_notify, counting bytes;
then TLS is closed both ways and the count goes back in the clear ("250 BYTES"). What is
received is not looked at: the rate is what Python's ssl module can decrypt on one core,
the ceiling for any Python server reading the same bytes (bench/tls_client.py --mode bare
sends the very bytes an SMTP server gets in DATA).

Once listening it prints "ready 127.0.0.1:PORT" and runs until SIGTERM or SIGINT.
Untrusted input: the client's bytes, only counted.
"""

from __future__ import annotations

import argparse
import signal
import socket
import ssl
import sys

BUFFER_BYTES = 256 * 1024


def serve_one(conn: socket.socket, context: ssl.SSLContext, buf: bytearray) -> None:
    conn.settimeout(300)
    try:
        tls = context.wrap_socket(conn, server_side=True)
    except (OSError, ssl.SSLError):
        conn.close()
        return
    view = memoryview(buf)
    received = 0
    try:
        tls.sendall(b"220 bare-tls\r\n")
        while True:
            n = tls.recv_into(view)
            if not n:
                break
            received += n
        plain = tls.unwrap()  # our close_notify; the count follows in the clear
        plain.sendall(b"250 %d\r\n" % received)
        plain.close()
    except (OSError, ssl.SSLError, ValueError):
        tls.close()  # a peer that left without close_notify (the harness's greeting check)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.create_server((args.host, args.port), backlog=128)
    host, port = listener.getsockname()[:2]
    print(f"ready {host}:{port}", flush=True)
    buf = bytearray(BUFFER_BYTES)
    try:
        while True:
            conn, _ = listener.accept()
            serve_one(conn, context, buf)
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
