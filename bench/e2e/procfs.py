"""What the harness reads from /proc: process trees, CPU time, RSS, open files, counters.

Untrusted input: none (the kernel's own files). Processes come and go while they are read,
so every reader skips a process that has gone.
"""

from __future__ import annotations

import os
import resource
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants, via /proc/<pid>/task/<tid>/children."""
    found, index = [pid], 0
    while index < len(found):
        parent = found[index]
        index += 1
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as file:
                    found.extend(int(child) for child in file.read().split())
            except OSError:
                pass
    return found


def cpu_ticks(pids: list[int]) -> dict[int, int]:
    """utime + stime, in clock ticks, of each process still alive."""
    ticks = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as file:
                fields = file.read().rpartition(")")[2].split()
        except OSError:
            continue
        ticks[pid] = int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return ticks


def all_process_ticks() -> dict[int, int]:
    """utime + stime of every process on the machine (kernel threads included)."""
    ticks = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as file:
                    fields = file.read().rpartition(")")[2].split()
                ticks[int(name)] = int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
    return ticks


def describe_process(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            command = file.read().replace(b"\0", b" ").decode(errors="replace").strip()
        if not command:  # a kernel thread
            with open(f"/proc/{pid}/comm") as file:
                command = f"[{file.read().strip()}]"
    except OSError:
        return f"pid {pid} (gone)"
    return command if len(command) <= 70 else command[:67] + "..."


def tree_rss(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/statm") as file:
                total += int(file.read().split()[1]) * PAGE
        except OSError:
            pass
    return total


def tree_pss(pid: int) -> int:
    """Total PSS (proportional set size) of a process tree: a page shared by n of its
    processes counts 1/n in each, so a process per connection is not charged its shared
    libraries again and again, as RSS charges them."""
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/smaps_rollup") as file:
                for line in file:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            pass
    return total


def listen_counters() -> dict[str, int]:
    """TcpExt ListenOverflows and ListenDrops (machine-wide)."""
    try:
        with open("/proc/net/netstat") as file:
            lines = file.read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return {key: int(table.get(key, 0)) for key in ("ListenOverflows", "ListenDrops")}
    return {}


def machine_busy_ticks() -> int:
    """CPU ticks the machine spent running processes and kernel threads.

    Interrupt and softirq time is left out: loopback TCP is processed there, on behalf of
    the server and client, and charged to no process.
    """
    with open("/proc/stat") as file:
        fields = [int(x) for x in file.readline().split()[1:]]
    user, nice, system = fields[:3]
    return user + nice + system


def listening_ports(pid: int) -> list[int]:
    """TCP ports in LISTEN state whose sockets are open in the process tree of pid."""
    inodes = set()
    for member in process_tree(pid):
        try:
            for fd in os.listdir(f"/proc/{member}/fd"):
                try:
                    target = os.readlink(f"/proc/{member}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    ports = []
    try:
        with open("/proc/net/tcp") as file:
            for line in file.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                    ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    except OSError:
        pass
    return ports


def wait_for_quiet(limit: float, busy_cores: float = 0.3, window: float = 0.5) -> float:
    """Wait (at most `limit` seconds) until the machine's other work uses less than
    `busy_cores` cores over `window` seconds; return the busy cores last seen.

    Other programs on the machine (a test suite, a build) take CPU from the server and the
    client and make every figure low; the harness waits for them, but not for ever.
    """
    deadline = time.monotonic() + limit
    while True:
        before = machine_busy_ticks()
        time.sleep(window)
        busy = (machine_busy_ticks() - before) / TICK / window
        if busy < busy_cores or time.monotonic() >= deadline:
            return busy


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


def open_sockets(pid: int) -> int:
    """Sockets open in the process tree of pid (a socket shared by several counts each time)."""
    total = 0
    for member in process_tree(pid):
        folder = f"/proc/{member}/fd"
        try:
            fds = os.listdir(folder)
        except OSError:
            continue
        for fd in fds:
            try:
                total += os.readlink(f"{folder}/{fd}").startswith("socket:")
            except OSError:
                pass
    return total


class RssSampler:
    """Highest total RSS of a process tree, sampled every `interval` seconds; with
    `count_sockets`, also the most connections it held at once: its open sockets beyond
    those open when sampling started (listeners and the like: the server is idle then)."""

    def __init__(self, pid: int, interval: float = 0.1, count_sockets: bool = False) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self.count_sockets, self.peak_connections = count_sockets, 0
        self.idle_sockets = open_sockets(pid) if count_sockets else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss(self.pid))
            if self.count_sockets:
                self.peak_connections = max(self.peak_connections,
                                            open_sockets(self.pid) - self.idle_sockets)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))
