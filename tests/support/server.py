"""A real `python -m minismtp serve` process for the tests that need one.

Every wait here is bounded: subprocess waits and log waits take a timeout, and `stop()`
kills whatever is left running (master first, then any worker it had), so the fixtures
built on it (tests/conftest.py) let no process outlive its test.
"""

from __future__ import annotations

import copy
import mailbox
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml

HOST = "127.0.0.1"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0


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
                 extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.tmp_path = tmp_path
        self.config_path = tmp_path / "minismtp.yaml"
        defaults = deep_merge(self.DEFAULTS, {"delivery": {"path": str(tmp_path / "mail")}})
        self.config = deep_merge(defaults, overrides or {})
        self.preexec_fn = preexec_fn
        self.extra_args = list(extra_args or [])
        self.env = env  # the master's environment; None: ours
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

    def start(self, timeout: float = START_TIMEOUT_S, workers: int | None = None) -> Server:
        """Start the master and wait for its workers: `workers` of them, by default as
        many as the configuration says."""
        self.write_config()
        cmd = [sys.executable, "-m", "minismtp", "serve", "--config", str(self.config_path),
               *self.extra_args]
        self.proc = subprocess.Popen(
            cmd, cwd=self.tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, preexec_fn=self.preexec_fn, env=self.env)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        m = self.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)", timeout)
        self.port = int(m.group(1))
        self.wait_for_log(r"starting \d+ worker\(s\)", timeout)
        self.wait_for_workers(workers or self.config["server"]["workers"], timeout)
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

    def reload(self, overrides: dict | None = None, timeout: float = 15.0) -> None:
        """Write the config (with `overrides` merged in), HUP, and wait until a new
        generation serves and every worker of the old one has gone."""
        old = set(self.worker_pids())
        self.write_config(overrides)
        mark = self.mark()
        self.send_signal(signal.SIGHUP)
        self.wait_for_log(r"reloaded .*: starting generation \d+ ", timeout, since=mark)
        wait_until(lambda: self.worker_pids() and not set(self.worker_pids()) & old, timeout,
                   message="the old generation to be replaced")

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
