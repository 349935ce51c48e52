"""Integration fixtures: a real `python -m minismtp serve` process and raw SMTP clients.

Every wait here is bounded: subprocess waits, socket reads and log waits all take a
timeout, and the fixture finalizer kills whatever a test left running (master first,
then any worker it had), so no process outlives its test.
"""

from __future__ import annotations

import copy
import mailbox
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from support.smtpdriver import stuff

HOST = "127.0.0.1"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything here starts real processes: `pytest -m "not integration"` leaves it out."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


def deep_merge(base: dict, extra: dict) -> dict:
    """`base` updated by `extra`, nested mappings merged key by key (both left intact)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # The state field follows the command name in parentheses; Z = zombie (already dead).
    return stat[stat.rindex(b")") + 2:][:1] != b"Z"


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def children_of(pid: int) -> list[int]:
    """Child pids of `pid` (/proc children file, or a scan of /proc when it is missing)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return sorted(int(p) for p in f.read().split())
    except FileNotFoundError:
        pass
    except OSError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ppid(int(entry)) == pid:
            found.append(int(entry))
    return sorted(found)


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB, from /proc/PID/status (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05,
               message: str = "condition") -> object:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


# --- the server process ---------------------------------------------------------------

class Server:
    """One `minismtp serve` master process with its config in `tmp_path`."""

    DEFAULTS: dict = {
        "server": {
            "hostname": "mx.test.invalid",
            "listen": [f"{HOST}:0"],
            "workers": 2,
            "shutdown_timeout": "10s",
        },
        "limits": {},
        "delivery": {"backend": "maildir", "fsync": True, "layout": "single"},
        "logging": {"level": "info"},
    }

    rss_kib = staticmethod(rss_kib)
    wait_until = staticmethod(wait_until)

    def __init__(self, tmp_path: Path, overrides: dict | None = None,
                 preexec_fn: Callable[[], None] | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.tmp_path = tmp_path
        self.config_path = tmp_path / "minismtp.yaml"
        defaults = deep_merge(self.DEFAULTS, {"delivery": {"path": str(tmp_path / "mail")}})
        self.config = deep_merge(defaults, overrides or {})
        self.preexec_fn = preexec_fn
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self.port = 0
        self.known_workers: set[int] = set()

    # -- configuration --

    @property
    def mail_dir(self) -> Path:
        return Path(self.config["delivery"]["path"])

    @property
    def hostname(self) -> str:
        return self.config["server"]["hostname"]

    @property
    def line_endings(self) -> str:
        return self.config["delivery"].get("line_endings", "lf")

    def stored_form(self, wire: bytes) -> bytes:
        """CRLF text as this server stores it (delivery.line_endings, default lf)."""
        return wire.replace(b"\r\n", b"\n") if self.line_endings == "lf" else wire

    def write_config(self, overrides: dict | None = None) -> None:
        """Write the config file, after merging `overrides` into the current settings."""
        if overrides:
            self.config = deep_merge(self.config, overrides)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    # -- process --

    def start(self, timeout: float = START_TIMEOUT_S) -> Server:
        self.write_config()
        cmd = [sys.executable, "-m", "minismtp", "serve", "--config", str(self.config_path),
               *self.extra_args]
        self.proc = subprocess.Popen(
            cmd, cwd=self.tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, preexec_fn=self.preexec_fn)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        m = self.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)", timeout)
        self.port = int(m.group(1))
        self.wait_for_log(r"starting \d+ worker\(s\)", timeout)
        self.wait_for_workers(self.config["server"]["workers"], timeout)
        return self

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:  # ends when the master and every worker have exited
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self, since: int = 0) -> str:
        with self._cond:
            return "\n".join(self.lines[since:])

    def mark(self) -> int:
        """A position in the log; pass it to wait_for_log(since=...) to skip older lines."""
        with self._cond:
            return len(self.lines)

    def wait_for_log(self, regex: str, timeout: float = 10.0, since: int = 0) -> re.Match:
        pattern = re.compile(regex)
        deadline = time.monotonic() + timeout
        with self._cond:
            checked = since
            while True:
                for line in self.lines[checked:]:
                    m = pattern.search(line)
                    if m:
                        return m
                checked = max(checked, len(self.lines))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = "\n".join(self.lines[-40:])
                    raise AssertionError(
                        f"no log line matching {regex!r} within {timeout}s; log tail:\n{tail}")
                self._cond.wait(min(remaining, 0.2))

    def count_log(self, regex: str, since: int = 0) -> int:
        pattern = re.compile(regex)
        with self._cond:
            return sum(1 for line in self.lines[since:] if pattern.search(line))

    def worker_pids(self) -> list[int]:
        pids = [p for p in children_of(self.pid) if _pid_alive(p)]
        self.known_workers.update(pids)
        return pids

    def wait_for_workers(self, count: int, timeout: float = 10.0) -> list[int]:
        def exact() -> list[int] | None:
            pids = self.worker_pids()
            return pids if len(pids) == count else None

        return wait_until(exact, timeout, message=f"{count} worker(s)")  # type: ignore[return-value]

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL; stray workers are killed too."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.worker_pids()  # remember them in case the master must be killed
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._kill_strays()
        if self._reader is not None:
            self._reader.join(5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.worker_pids()
            self.proc.kill()
            self.proc.wait(5)
        self._kill_strays()

    def _kill_strays(self) -> None:
        """Workers of ours still running after their master is gone (re-parented)."""
        master = self.pid
        for pid in self.known_workers:
            if pid == master or not _pid_alive(pid):
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"minismtp" not in f.read():
                        continue  # the pid was reused by something else
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    # -- maildir --

    def files(self, sub: str, root: Path | None = None) -> list[Path]:
        directory = (root or self.mail_dir) / sub
        if not directory.is_dir():
            return []
        return sorted(p for p in directory.iterdir() if p.is_file())

    def maildir_messages(self, root: Path | None = None) -> list[tuple[str, bytes]]:
        """(key, raw bytes) of every message `mailbox.Maildir` finds, ordered by key."""
        md = mailbox.Maildir(str(root or self.mail_dir), factory=None, create=False)
        out = []
        for key in sorted(md.keys()):
            with md.get_file(key) as f:
                out.append((key, f.read()))
        return out


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers with per-test overrides: make_server({"limits": {...}}, workers=1)."""
    started: list[Server] = []

    def make(overrides: dict | None = None, *, start: bool = True, **kwargs) -> Server:
        server = Server(tmp_path, overrides, **kwargs)
        started.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server) -> Server:
    return make_server()


# --- a raw SMTP client ------------------------------------------------------------------

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

    def __init__(self, port: int, host: str = HOST, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
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


@pytest.fixture
def raw_clients() -> Iterator[Callable[..., RawClient]]:
    """Open raw clients that are all closed when the test ends."""
    opened: list[RawClient] = []

    def connect(port: int, **kwargs) -> RawClient:
        client = RawClient(port, **kwargs)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


