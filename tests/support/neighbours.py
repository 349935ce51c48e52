"""The real programs the interop tests run against minismtp: found, or reported missing.

In CI (the `CI` environment variable set, as `.ci/run` has it) a missing program fails
the test: `.ci/install-neighbours` installs every one of them, so one missing there is a
broken install, not a reason to skip. Anywhere else the test is skipped, with the
program named and the command that installs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.server import children_of

# Daemons and admin tools live outside a non-root PATH.
_EXTRA_DIRS = ("/usr/sbin", "/sbin", "/usr/lib/postfix/sbin")
INSTALL = "bash .ci/install-neighbours installs it (as root)"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def missing(reason: str) -> None:
    """Fail in CI, skip elsewhere; never returns."""
    if in_ci():
        pytest.fail(f"{reason} (in CI no interop test may be skipped)", pytrace=False)
    pytest.skip(reason)


def program(name: str) -> str:
    """The path of an installed program, or the test is failed (CI) or skipped."""
    found = shutil.which(name)
    if found is None:
        for directory in _EXTRA_DIRS:
            candidate = os.path.join(directory, name)
            if os.access(candidate, os.X_OK):
                found = candidate
                break
    if found is None:
        missing(f"{name} is not installed; {INSTALL}")
    return found  # type: ignore[return-value]


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        missing(f"{what} runs its own instance as root; run the tests as root")


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port nothing listened on a moment ago, for a program that cannot be
    told to bind port 0 and say which it got. Another process could take it first; the
    instance then fails to start, which its fixture reports."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, host: str = "127.0.0.1") -> bool:
    """True once something accepts connections on `port`, False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory other users can traverse (mode 0755), unlike pytest's
    `tmp_path` (under a 0700 directory): Postfix's and Dovecot's unprivileged processes
    and minismtp's workers running as `server.user` must reach files in it."""
    path = Path(tempfile.mkdtemp(prefix="minismtp-interop-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- processes a neighbour leaves behind ------------------------------------------------

def start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (None once it is gone or a zombie): with the pid
    it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == b"Z":
        return None
    return int(fields[19])


def process_tree(pid: int) -> dict[int, int]:
    """{pid: start time} of `pid` and all its descendants alive now."""
    found: dict[int, int] = {}
    todo = [pid]
    while todo and len(found) < 10_000:
        current = todo.pop()
        started = start_time(current)
        if started is None or current in found:
            continue
        found[current] = started
        todo.extend(children_of(current))
    return found


def still_running(tree: dict[int, int]) -> list[int]:
    return sorted(pid for pid, started in tree.items() if start_time(pid) == started)


def end_processes(tree: dict[int, int], timeout: float) -> list[int]:
    """Wait up to `timeout` for the processes in `tree` to exit, then SIGKILL those left
    (the same processes: pid and start time); returns the pids that had to be killed."""
    deadline = time.monotonic() + timeout
    while still_running(tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = still_running(tree)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left
