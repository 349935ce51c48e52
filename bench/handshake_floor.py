"""What one full TLS handshake costs the server inside OpenSSL alone: the floor under S7.

    python bench/handshake_floor.py              # ECDSA P-256, as bench/ uses, 300 handshakes
    python bench/handshake_floor.py --tickets 0 --count 1000

A server and a client SSLObject talk through memory BIOs in this one process; only the
server's calls are timed, in thread CPU time. No socket, no event loop, no SMTP: what is
left is what any server pays per full handshake (key exchange, signature, Finished,
session tickets), whatever it is written in. S7's server CPU per message cannot go below
this figure plus a plaintext session's cost (S1), so it tells how far a ratio target
against another server can go.
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import time


def contexts(tickets: int) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    import trustme  # the test extra, as for the other TLS scenarios

    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    leaf = ca.issue_cert("localhost", key_type=trustme.KeyType.ECDSA)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(server)
    server.num_tickets = tickets
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    return server, client


def server_cost(server: ssl.SSLContext, client: ssl.SSLContext) -> float:
    """Seconds of this thread's CPU spent in the server side of one full handshake."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    spent, server_done, client_done = 0.0, False, False
    while not (server_done and client_done):
        if not client_done:
            try:
                c.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not server_done:
            started = time.thread_time()
            try:
                s.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            spent += time.thread_time() - started
        c_in.write(s_out.read())
    return spent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--tickets", type=int, default=2, help="session tickets sent "
                        "(OpenSSL's default, and tls.session_tickets' default: 2)")
    args = parser.parse_args()
    server, client = contexts(args.tickets)
    for _ in range(20):
        server_cost(server, client)  # warm-up
    costs = [server_cost(server, client) for _ in range(args.count)]
    print(f"{ssl.OPENSSL_VERSION}, ECDSA P-256, {args.tickets} ticket(s): server CPU per "
          f"full handshake median {statistics.median(costs) * 1e6:.0f} us "
          f"(min {min(costs) * 1e6:.0f}), {args.count} handshakes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
