"""The servers compared: how each is started, found listening, checked and stopped.

Untrusted input: the servers' own output, searched for the port they listen on and for
lines that look like trouble. Each server runs in a session of its own and is stopped by
its pid (then any process left of its tree, by pid).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from e2e import BENCH, HOST, MIB, ROOT
from e2e.edge import (HIGH_PER_CLIENT_LIMITS, PROXY_V1_UNKNOWN, PROXY_V2_LOCAL,
                      config_refused, listener_yaml, write_users_file)
from e2e.postfix import free_port, write_instance
from e2e.procfs import listening_ports, process_tree, raise_nofile
from e2e.tlsfiles import CertFiles


def find_program(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/libexec/postfix", "/usr/lib/postfix/sbin"):
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    return None


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    name: str
    kind: str  # "smtp-sink", "aiosmtpd", "minismtp", "postfix" or "bare-tls"
    backend: str  # "discard" or "maildir"
    fsync: bool = False
    compare_to: tuple[str, ...] = ()  # peers its ratios are taken against
    short: str = ""  # name in the ratio column
    extra_config: str = ""  # YAML sections appended to minismtp's generated config
    reuse_port: bool = False  # minismtp: each worker its own SO_REUSEPORT socket
    sched_batch: str = "auto"  # minismtp: SCHED_BATCH workers unless delivery fsyncs
    log_level: str = "warning"  # minismtp: "info" (the default) logs a line per message
    checkout: Path | None = None  # minismtp: the checkout it runs from; None: this one
    scenarios: tuple[str, ...] = ()  # the only scenarios it can run; () = any
    # minismtp's edge features (e2e/edge.py); the S1E/S1B client sends what they need.
    proxy: str = ""  # listener proxy_protocol version ("v2"): a PROXY header comes first
    auth: str = ""  # listener auth mode ("accept_any", "htpasswd"), required before MAIL
    bcrypt_cost: int = 0  # htpasswd: the cost of the users file's bcrypt hash
    limits_extra: str = ""  # YAML lines for the `limits` section (2-space indented)
    client_noop: bool = False  # S1E's client sends NOOP after EHLO: AUTH's round trip alone
    client_pipelines_auth: bool = False  # S1E's client sends AUTH PLAIN with MAIL FROM

    def missing(self) -> str | None:
        """Why this server cannot run here, or None."""
        if self.kind == "smtp-sink" and not find_program("smtp-sink"):
            return "smtp-sink is not installed (bash bench/setup.sh installs postfix)"
        if self.kind == "aiosmtpd" and importlib.util.find_spec("aiosmtpd") is None:
            return "aiosmtpd is not installed (bash bench/setup.sh: pip install aiosmtpd)"
        if self.kind == "minismtp" and importlib.util.find_spec("yaml") is None:
            return "PyYAML, minismtp's one dependency, is not installed (pip install -e .)"
        if self.kind == "postfix":
            if not (find_program("postfix") and find_program("smtpd")):
                return "postfix is not installed (bash bench/setup.sh installs it)"
            if os.geteuid() != 0:
                return "a private Postfix instance must be started as root"
            try:
                pwd.getpwnam("postfix")
            except KeyError:
                return "no postfix user (the postfix package makes it)"
        if self.checkout and not (self.checkout / "minismtp" / "__main__.py").is_file():
            return f"{self.checkout} holds no minismtp package (minismtp/__main__.py)"
        if self.auth == "htpasswd" and importlib.util.find_spec("bcrypt") is None:
            return "bcrypt is not installed (pip install -e '.[auth]')"
        if self.limits_extra:  # a key an older checkout (a baseline) may not know
            return config_refused(self.checkout or ROOT, self.limits_extra)
        return None


NO_MATCH_FAULTS = """\
faults:
  seed: 1
  rules:
    - {name: never-sender, stage: mail, sender: "*@never.invalid", reply: "450 4.7.1 No"}
    - {name: never-rcpt, stage: rcpt, recipient: "*@never.invalid", reply: "550 5.1.1 No"}
    - {name: never-client, stage: end_of_data, client: "192.0.2.0/24", delay: 0.5}
"""

SERVERS = (
    ServerSpec("smtp-sink", "smtp-sink", "discard", short="sink"),
    ServerSpec("aiosmtpd-discard", "aiosmtpd", "discard", short="aio"),
    ServerSpec("aiosmtpd-maildir", "aiosmtpd", "maildir", short="aio-md"),
    ServerSpec("minismtp-discard", "minismtp", "discard",
               compare_to=("smtp-sink", "aiosmtpd-discard", "postfix-tls", "bare-tls")),
    ServerSpec("minismtp-maildir", "minismtp", "maildir",
               compare_to=("aiosmtpd-maildir",)),
    ServerSpec("minismtp-maildir-fsync", "minismtp", "maildir", fsync=True,
               compare_to=("aiosmtpd-maildir",)),
    # The cost of fault rules that never fire (and of the counters, always on).
    ServerSpec("minismtp-faults", "minismtp", "discard", short="mini-faults",
               compare_to=("minismtp-discard",), extra_config=NO_MATCH_FAULTS),
    # The cost of the per-client limits (limits.per_client), every one set, none reached:
    # each session and each recipient counted in the shared table.
    ServerSpec("minismtp-perclient", "minismtp", "discard", short="mini-pc",
               compare_to=("minismtp-discard",), limits_extra=HIGH_PER_CLIENT_LIMITS),
    ServerSpec("minismtp-reuseport", "minismtp", "discard", short="mini-rp",
               compare_to=("smtp-sink", "aiosmtpd-discard", "minismtp-discard"),
               reuse_port=True),
    # Workers under the ordinary policy: a woken worker preempts whatever runs (the client).
    ServerSpec("minismtp-nobatch", "minismtp", "discard", short="mini-nobatch",
               compare_to=("smtp-sink", "aiosmtpd-discard", "minismtp-discard"),
               sched_batch="false"),
    # The default log level: one line per message, written to a file as a service's log.
    ServerSpec("minismtp-info", "minismtp", "discard", short="mini-info",
               compare_to=("smtp-sink", "minismtp-discard"), log_level="info"),
    # The edge features, in S1E beside minismtp-discard with the same client (which sends
    # a PROXY header or AUTH only where the listener takes one): what each costs.
    ServerSpec("minismtp-proxy", "minismtp", "discard", short="mini-proxy",
               compare_to=("minismtp-discard",), proxy="v2", scenarios=("S1E",)),
    ServerSpec("minismtp-auth", "minismtp", "discard", short="mini-auth",
               compare_to=("minismtp-discard", "minismtp-noop"), auth="accept_any",
               scenarios=("S1E", "S1B")),
    # The same, with a client that sends AUTH PLAIN and MAIL FROM in one write (RFC 4954
    # section 4 allows it for PLAIN with an initial response): AUTH without its round trip.
    ServerSpec("minismtp-auth-pipelined", "minismtp", "discard", short="mini-auth-pipe",
               compare_to=("minismtp-discard", "minismtp-auth"), auth="accept_any",
               client_pipelines_auth=True, scenarios=("S1E",)),
    # minismtp-discard with a NOOP where AUTH goes: the command turn AUTH adds to every
    # session, without AUTH, so minismtp-auth against it is what AUTH itself costs.
    ServerSpec("minismtp-noop", "minismtp", "discard", short="mini-noop",
               compare_to=("minismtp-discard",), client_noop=True, scenarios=("S1E",)),
    # Per-client limits that never refuse, in S1E's client (minismtp-perclient measures
    # them with smtp-source); skipped for a checkout whose minismtp has no
    # `limits.per_client` (ServerSpec.missing runs its check-config), a baseline say.
    ServerSpec("minismtp-limits", "minismtp", "discard", short="mini-limits",
               compare_to=("minismtp-discard",), limits_extra=HIGH_PER_CLIENT_LIMITS,
               scenarios=("S1E",)),
    ServerSpec("minismtp-proxy-limits", "minismtp", "discard", short="mini-proxy-limits",
               compare_to=("minismtp-discard", "minismtp-proxy"), proxy="v2",
               limits_extra=HIGH_PER_CLIENT_LIMITS, scenarios=("S1E",)),
    # AUTH checked against a bcrypt hash on the checker threads (S1B): at the bcrypt
    # package's default cost (12), and at `htpasswd -B`'s (5).
    ServerSpec("minismtp-bcrypt12", "minismtp", "discard", short="mini-bcrypt12",
               compare_to=("minismtp-auth",), auth="htpasswd", bcrypt_cost=12,
               scenarios=("S1B",)),
    ServerSpec("minismtp-bcrypt5", "minismtp", "discard", short="mini-bcrypt5",
               compare_to=("minismtp-auth",), auth="htpasswd", bcrypt_cost=5,
               scenarios=("S1B",)),
    # The C reference with TLS: Postfix's real smtpd (one process per session), its queue
    # and the discard transport, in a private instance (e2e/postfix.py). TLS scenarios only.
    ServerSpec("postfix-tls", "postfix", "discard", short="pfx-tls",
               scenarios=("S7", "S8", "S9")),
    # S8's ceiling for Python: one process that only decrypts and counts.
    ServerSpec("bare-tls", "bare-tls", "discard", short="bare", scenarios=("S8",)),
)
# minismtp warns at start that auth mode accept_any takes every password: expected here.
ACCEPT_ANY_WARNING = "accept_any takes every password"
BY_NAME = {spec.name: spec for spec in SERVERS}
SHORT = {spec.name: spec.short or spec.name for spec in SERVERS}
BASELINE = "@baseline"  # suffix of a minismtp server run from another checkout


def add_baseline(names: list[str], checkout: Path) -> list[str]:
    """`names`, each minismtp server followed by its twin run from `checkout` (say, the
    commit before a change): same configuration, measured in the same rounds. The twin's
    ratios are taken against the same peers, and the original's also against its twin.
    Twins are registered in BY_NAME and SHORT, where the report looks servers up."""
    out = []
    for name in names:
        out.append(name)
        spec = BY_NAME[name]
        if spec.kind != "minismtp" or spec.checkout is not None:
            continue
        twin = dataclasses.replace(spec, name=name + BASELINE, short="baseline",
                                   checkout=checkout.resolve())
        BY_NAME[twin.name], SHORT[twin.name] = twin, twin.short
        if twin.name not in spec.compare_to:
            BY_NAME[name] = dataclasses.replace(spec, compare_to=(*spec.compare_to, twin.name))
        out.append(twin.name)
    return out

MINISMTP_WORKERS = 2  # one per core of the machines this is run on
MINISMTP_CONFIG = """\
# Generated by bench/run.py for one benchmark server.
server:
  hostname: minismtp.bench
  listen: [{listen}]
  workers: {workers}
  max_connections: {max_connections}
  backlog: 4096
  reuse_port: {reuse_port}
  sched_batch: {sched_batch}
  shutdown_timeout: 2s
limits:
  max_message_size: 64M
{limits_extra}delivery:
  backend: {backend}
  path: {path}
  fsync: {fsync}
logging:
  level: {log_level}
"""
MINISMTP_TLS = """\
tls:
  certificates:
    - {{cert: {cert}, key: {key}}}
"""


class Server:
    """One running server: started in its own session, stopped by its pid."""

    def __init__(self, spec: ServerSpec, workdir: Path, *, connections: int, tls: str = "",
                 cert: CertFiles | None = None) -> None:
        self.spec = spec
        self.tls = tls  # "", "starttls" or "implicit": how its listener speaks TLS
        self.cert = cert
        self.postfix_config: Path | None = None
        self.workdir = workdir
        self.maildir = workdir / "mail"
        self.connections = connections  # how many at once it must be able to hold
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.pids: list[int] = []

    def command(self) -> list[str]:
        spec = self.spec
        if spec.kind == "smtp-sink":
            cap = max(2000, self.connections + 500)
            command = [find_program("smtp-sink") or "smtp-sink"]
            if os.geteuid() == 0:
                command += ["-u", "nobody"]  # required when started as root
            return command + ["-m", str(cap), f"{HOST}:0", "4096"]
        if spec.kind == "aiosmtpd":
            command = [sys.executable, str(BENCH / "aiosmtpd_server.py"),
                       "--handler", spec.backend, "--host", HOST, "--port", "0",
                       "--backlog", "4096", "--max-message-size", str(64 * MIB)]
            if spec.backend == "maildir":
                command += ["--maildir", str(self.maildir)]
            if self.tls:
                command += ["--tls-cert", str(self.cert.cert), "--tls-key", str(self.cert.key)]
            if self.tls == "implicit":
                command.append("--implicit-tls")
            return command
        if spec.kind == "bare-tls":
            return [sys.executable, str(BENCH / "bare_tls_server.py"), "--host", HOST,
                    "--port", "0", "--cert", str(self.cert.cert), "--key", str(self.cert.key)]
        if spec.kind == "postfix":
            self.port = free_port()
            self.postfix_config = write_instance(
                self.workdir, port=self.port, chain=self.cert.chain,
                implicit=self.tls == "implicit", process_limit=max(100, self.connections + 100),
                max_message_bytes=64 * MIB)
            # start-fg: the master stays a child of this command, so its tree is ours.
            return [find_program("postfix") or "postfix", "-c", str(self.postfix_config),
                    "start-fg"]
        # On one shared socket the split between workers is up to the scheduler: a burst
        # of S6's 10,000 connections can land mostly on one, so each may hold them all.
        per_worker = max(4096, self.connections + 1000)
        config = self.workdir / "minismtp.yaml"
        users_file = (write_users_file(self.workdir, spec.bcrypt_cost)
                      if spec.auth == "htpasswd" else None)
        listen = listener_yaml(f"{HOST}:0", tls=self.tls, proxy=spec.proxy, auth=spec.auth,
                               users_file=users_file)
        tls_section = MINISMTP_TLS.format(cert=json.dumps(str(self.cert.cert)),
                                          key=json.dumps(str(self.cert.key))) if self.tls else ""
        config.write_text(MINISMTP_CONFIG.format(listen=listen,
            workers=MINISMTP_WORKERS, max_connections=per_worker, backend=spec.backend,
            path=json.dumps(str(self.maildir)), fsync=str(spec.fsync).lower(),
            reuse_port=str(spec.reuse_port).lower(), sched_batch=spec.sched_batch,
            log_level=spec.log_level, limits_extra=spec.limits_extra)
            + tls_section + spec.extra_config)
        return [sys.executable, "-m", "minismtp", "serve", "--config", str(config)]

    def start(self, timeout: float = 20.0) -> None:
        env = dict(os.environ, PYTHONPATH=str(self.spec.checkout or ROOT))
        env.pop("PYTHONASYNCIODEBUG", None)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.command(), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, start_new_session=True, preexec_fn=raise_nofile)
        deadline = time.monotonic() + timeout
        while not self.port:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with status "
                                   f"{self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.spec.name}: no listening port after {timeout:.0f}s")
            self.port = self.port or self._announced_port() or self._proc_port()
            if not self.port:
                time.sleep(0.02)
        while True:  # listening is not enough: wait for the 220 greeting
            problem = greet(self.port, implicit=self.tls == "implicit",
                            proxy=self.spec.proxy)
            if problem is None:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.spec.name}: no greeting: {problem}; "
                                   f"{self.log_tail()}")
            time.sleep(0.05)
        self.pids = process_tree(self.proc.pid)

    def _announced_port(self) -> int:
        """The port from "listening on 127.0.0.1:PORT" (minismtp) or "ready HOST:PORT"."""
        for path in (self.stderr_path, self.stdout_path):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            match = re.search(r"(?:listening on|ready) 127\.0\.0\.1:(\d+)", text)
            if match:
                return int(match[1])
        return 0

    def _proc_port(self) -> int:
        if self.spec.kind in ("aiosmtpd", "bare-tls"):
            return 0  # prints its ready line only once serving
        if self.spec.kind == "minismtp" and len(process_tree(self.proc.pid)) < 2:
            return 0  # bound by the master before the workers exist: wait for them
        ports = listening_ports(self.proc.pid)
        return ports[0] if len(ports) == 1 else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tree(self) -> list[int]:
        return process_tree(self.proc.pid) if self.alive() else []

    def stop(self) -> None:
        if self.proc is None:
            return
        pids = self.tree()
        if self.postfix_config is not None and self.proc.poll() is None:
            # The master ends its children; the start-fg command then returns.
            subprocess.run([find_program("postfix") or "postfix", "-c",
                            str(self.postfix_config), "stop"], capture_output=True, timeout=30)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for pid in pids:  # anything left of its tree, by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)

    def log_tail(self, lines: int = 5) -> str:
        text = ""
        for path in (self.stderr_path, self.stdout_path):
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        tail = [line for line in text.splitlines() if line.strip()][-lines:]
        return " | ".join(tail) or "(no output)"

    def log_problems(self) -> list[str]:
        """Lines of the server's own output that look like trouble."""
        try:
            text = self.stderr_path.read_text(errors="replace")
            text += self.stdout_path.read_text(errors="replace")
            if self.postfix_config is not None and (self.workdir / "maillog").exists():
                text += (self.workdir / "maillog").read_text(errors="replace")
        except OSError:
            return []
        pattern = re.compile(r"WARNING|ERROR|CRITICAL|Traceback|fatal|panic|error", re.I)
        return [line.strip() for line in text.splitlines()
                if pattern.search(line) and "listening on" not in line
                and ACCEPT_ANY_WARNING not in line]

    def maildir_count(self) -> tuple[int, int]:
        """(files in new/, files left in tmp/)."""
        def count(folder: Path) -> int:
            try:
                return sum(1 for _ in os.scandir(folder))
            except OSError:
                return 0
        return count(self.maildir / "new"), count(self.maildir / "tmp")

    def clear_maildir(self) -> None:
        folder = self.maildir / "new"
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def greet(port: int, timeout: float = 5.0, implicit: bool = False,
          proxy: str = "") -> str | None:
    """Connect (with proxy, then a PROXY header saying LOCAL, as a balancer's health
    check does; with implicit, then the TLS handshake), read the 220 greeting, QUIT.
    None if it worked, else what went wrong."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as plain:
            sock = plain
            if proxy:
                plain.sendall(PROXY_V1_UNKNOWN if proxy == "v1" else PROXY_V2_LOCAL)
            if implicit:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                sock = context.wrap_socket(plain)
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return "closed before the greeting"
                data += chunk
            if not data.startswith(b"220"):
                return f"greeting {data[:80]!r}"
            sock.sendall(b"QUIT\r\n")
            try:
                sock.recv(4096)
            except OSError:
                pass
    except OSError as exc:
        return str(exc)
    return None
