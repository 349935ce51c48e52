"""aiosmtpd as a benchmark peer: one asyncio process, a discard or a Maildir handler.

    python bench/aiosmtpd_server.py --handler discard [--host 127.0.0.1] [--port 0]
    python bench/aiosmtpd_server.py --handler maildir --maildir DIR
    python bench/aiosmtpd_server.py --tls-cert CERT --tls-key KEY [--implicit-tls]

The server is built the way aiosmtpd's own Controller builds it (its SMTP protocol class as
the factory of loop.create_server), except that it runs in the main thread and listens with
a 4096 backlog, like the other servers in the benchmark. Handlers:

- discard: handle_DATA answers "250 OK" and drops the message;
- maildir: aiosmtpd.handlers.Mailbox, which parses the message with the email package and
  stores it with mailbox.Maildir.add (no fsync: that is how the stdlib writes a Maildir).

With --tls-cert and --tls-key, STARTTLS is offered (aiosmtpd's `tls_context` argument);
with --implicit-tls as well, every connection is TLS from its first byte instead (the
`ssl` argument of loop.create_server, which is how aiosmtpd's Controller does it with its
`ssl_context`), and STARTTLS is not offered.

Once listening it prints one line to stdout, "ready 127.0.0.1:PORT", and runs until SIGTERM
or SIGINT. The host name is given once here: left unset, aiosmtpd would call
socket.getfqdn() for every connection.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys

from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import SMTP


class Discard:
    async def handle_DATA(self, server: SMTP, session: object, envelope: object) -> str:
        return "250 OK"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handler", choices=("discard", "maildir"), default="discard")
    parser.add_argument("--maildir", help="Maildir root (required with --handler maildir)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backlog", type=int, default=4096)
    parser.add_argument("--max-message-size", type=int, default=64 << 20)
    parser.add_argument("--hostname", default="aiosmtpd.bench")
    parser.add_argument("--tls-cert", help="PEM certificate: offer STARTTLS")
    parser.add_argument("--tls-key", help="PEM key of --tls-cert")
    parser.add_argument("--implicit-tls", action="store_true",
                        help="TLS from the first byte instead of STARTTLS")
    args = parser.parse_args(argv)
    context = None
    if args.tls_cert or args.tls_key or args.implicit_tls:
        if not (args.tls_cert and args.tls_key):
            parser.error("TLS needs both --tls-cert and --tls-key")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    starttls = None if args.implicit_tls else context
    if args.handler == "maildir":
        if not args.maildir:
            parser.error("--handler maildir needs --maildir DIR")
        for sub in ("tmp", "new", "cur"):  # Maildir() creates them only for a new root
            os.makedirs(os.path.join(args.maildir, sub), exist_ok=True)
        handler: object = Mailbox(args.maildir)
    else:
        handler = Discard()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    def factory() -> SMTP:
        return SMTP(handler, data_size_limit=args.max_message_size, hostname=args.hostname,
                    tls_context=starttls, loop=loop)

    server = loop.run_until_complete(
        loop.create_server(factory, host=args.host, port=args.port, backlog=args.backlog,
                           ssl=context if args.implicit_tls else None))
    host, port = server.sockets[0].getsockname()[:2]
    print(f"ready {host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        loop.run_until_complete(stop.wait())
    finally:
        server.close()  # open sessions die with the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
