"""End-to-end benchmark harness (bench/run.py): servers, clients, scenarios, report.

Untrusted input: none from the network beyond what the clients read back from the servers
under test, which is parsed only to count replies; every address used is 127.0.0.1.

- procfs.py     process trees, CPU, RSS, open files and TCP counters read from /proc
- workdir.py    the folder that holds every server's Maildir and logs; a file system probe
- servers.py    the servers compared (smtp-sink, aiosmtpd, minismtp, Postfix, bare TLS)
- postfix.py    a private Postfix instance (main.cf, master.cf) for postfix-tls
- edge.py       minismtp's edge variants: PROXY and AUTH listeners, users file, limits
- tlsfiles.py   the ECDSA P-256 certificate every TLS server uses, made at run time
- clients.py    smtp-source, bench/pipeline_client.py, bench/session_client.py,
                bench/tls_client.py, idle holders
- scenarios.py  S1..S9, S1E, S1B and how one scenario is run and measured against one server
- report.py     the table, the ratios to peers and the targets
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
BENCH = ROOT / "bench"
HOST = "127.0.0.1"  # the only address any load is sent to
KIB = 1024
MIB = 1024 * 1024
IDLE_CONNECTIONS = 10_000  # S6
CLIENT_TIMEOUT_S = 300.0  # any one client run is killed after this long


def progress(text: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)
