"""What minismtp's edge variants need (S1E, S1B): a listener mapping with `proxy_protocol`
and `auth`, a users file holding a bcrypt hash, per-client limits that never refuse, and
whether the checkout run knows a configuration key yet.

Untrusted input: none (the checkout's own `check-config` output, shown as a skip reason).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_USER = "bench"
BENCH_PASSWORD = "bench-password"  # what bench/session_client.py sends, AUTH PLAIN

# Top-level `limits.per_client`, so high that no session is ever
# refused, so a run measures what keeping the counts costs, not what refusing does.
HIGH_PER_CLIENT_LIMITS = """\
  per_client:
    max_sessions: 100000
    max_new_sessions_per_minute: 10000000
    max_recipients_per_minute: 100000000
"""

# A PROXY v2 header with command LOCAL (a balancer's health check): the harness's
# greeting check sends it first on a PROXY listener, which answers nothing before a header.
PROXY_V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x20\x00\x00\x00"
PROXY_V1_UNKNOWN = b"PROXY UNKNOWN\r\n"


def listener_yaml(address: str, *, tls: str = "", proxy: str = "", auth: str = "",
                  users_file: Path | None = None) -> str:
    """One `server.listen` entry, flow style: the address alone, or a mapping with how
    its connections use TLS, the PROXY protocol and AUTH. AUTH is required (MAIL gets 530
    without it, so a client that skipped it would fail the run, not go unmeasured) and
    offered before TLS, since the bench listeners are plaintext."""
    if not (tls or proxy or auth):
        return json.dumps(address)
    parts = [f"address: {json.dumps(address)}"]
    if tls:
        parts.append(f"tls: {tls}")
    if proxy:
        parts.append(f'proxy_protocol: {{version: {proxy}, trusted: ["127.0.0.1/32"]}}')
    if auth:
        users = f", users_file: {json.dumps(str(users_file))}" if users_file else ""
        parts.append(f"auth: {{mode: {auth}{users}, require: true, allow_plaintext: true}}")
    return "{" + ", ".join(parts) + "}"


def write_users_file(folder: Path, cost: int) -> Path:
    """A users file as `htpasswd -B -C COST` writes it (`user:$2y$...`; the bcrypt package
    writes `$2b$`, which minismtp takes alike), with the bench user's hash at `cost`."""
    import bcrypt  # minismtp's `auth` extra; ServerSpec.missing() checks it is there

    hashed = bcrypt.hashpw(BENCH_PASSWORD.encode(), bcrypt.gensalt(rounds=cost)).decode()
    path = folder / "users"
    path.write_text(f"{BENCH_USER}:{hashed}\n")
    return path


@functools.lru_cache(maxsize=None)
def config_refused(checkout: Path, limits_extra: str) -> str | None:
    """Why the minismtp in `checkout` refuses a configuration with `limits_extra` in its
    `limits` section (its first complaint), or None if it takes it: a variant using a
    key that is not there yet is skipped with the reason instead of failing to start."""
    text = ("server:\n  listen: [\"127.0.0.1:0\"]\n  workers: 1\nlimits:\n" + limits_extra
            + "delivery:\n  backend: discard\n")
    with tempfile.TemporaryDirectory(prefix="bench-check-") as folder:
        config = Path(folder) / "minismtp.yaml"
        config.write_text(text)
        env = dict(os.environ, PYTHONPATH=str(checkout))
        done = subprocess.run([sys.executable, "-m", "minismtp", "check-config", "--config",
                               str(config)], capture_output=True, text=True, env=env,
                              cwd=folder, timeout=60)
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines()
             if line.strip()]
    complaint = next((line for line in lines if "limits" in line), lines[0] if lines else "")
    return f"this minismtp refuses the configuration ({complaint[:200]})"
