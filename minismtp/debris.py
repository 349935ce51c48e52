"""Removing the half-written message files a dead worker left in a Maildir's tmp/.

Untrusted input: the file names found in tmp/. The directory is the operator's and other
programs may share it, so only a regular file whose name has the exact form the Maildir
sink gives (`<seconds>.M<usec>P<pid>Q<counter>.<host>`, delivery/maildir.py) with the
dead worker's pid and this host's name is removed: never another host's file (two
instances may share a Maildir over NFS, or from containers whose pids start alike),
never a directory, never anything outside tmp/ (new/ holds acknowledged mail). A tmp/
directory may hold many files, so the master sweeps a bounded number of entries per turn
of its loop and resumes on the next. The workers' user owns the Maildir and may have put a
symlink in place of tmp/: the master (root, maybe) opens tmp/ without following one
(maildir.open_subdir) and removes names relative to that descriptor.

At start, before any worker runs, `remove_orphans` removes the files of this host's
workers that are all gone, also those of a master killed with them (SIGKILL of the whole
service): no record of them is left, so a pid that is no live process is the rule. A pid
in use again, by anything, keeps its files (the 36-hour rule of clean_tmp takes them);
another instance on this host sharing the Maildir keeps its own, its workers being alive.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections import deque
from collections.abc import Container, Iterator

from minismtp.delivery.maildir import open_maildir_tmp, this_host

log = logging.getLogger("minismtp.master")

_NAME = re.compile(r"[0-9]+\.M[0-9]+P([0-9]+)Q[0-9]+\.(.+)", re.ASCII | re.DOTALL)


def owner(name: str) -> tuple[int, str] | None:
    """The pid and the (encoded) host in a Maildir sink's file name, or None for any
    other name."""
    match = _NAME.fullmatch(name)
    return (int(match.group(1)), match.group(2)) if match else None


def _remove(entry: os.DirEntry[str], tmp_fd: int, tmp_dir: str) -> bool:
    """Unlink `entry` of the tmp/ open on `tmp_fd` if it is a regular file (no symlink,
    no directory); whether it was. A failure is logged (`tmp_dir` names the place)."""
    try:
        if not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
            return False
        os.unlink(entry.name, dir_fd=tmp_fd)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("cannot remove %s: %s", os.path.join(tmp_dir, entry.name),
                    exc.strerror or exc)
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process; no pid at all (never ours: kept)
    return True


def remove_orphans(tmp_dir: str) -> int:
    """At start: remove from `tmp_dir` this host's sink files whose pid is no live
    process (see the module docstring); how many. OSError opening it propagates."""
    fd = open_maildir_tmp(tmp_dir)
    host, removed = this_host(), 0
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                found = owner(entry.name)
                if found is not None and found[1] == host and not _pid_alive(found[0]):
                    removed += _remove(entry, fd, tmp_dir)
    finally:
        os.close(fd)
    if removed:
        log.info("removed %d unfinished message file(s) of stopped workers from %s",
                 removed, tmp_dir)
    return removed


class Sweeper:
    def __init__(self) -> None:
        self._jobs: deque[tuple[str, int, frozenset[str]]] = deque()  # dir, pid, hosts
        self._entries: Iterator[os.DirEntry[str]] | None = None
        self._fd = -1  # the tmp/ being swept; its entries' names are relative to it
        self._removed = 0

    def add(self, tmp_dir: str, pid: int, host: str) -> None:
        """Sweep `tmp_dir` of worker `pid`'s files: those named with `host`, this host's
        name when the worker was started (`this_host()`, which its sink wrote), or with
        the name now (a rename in the moment between its start and its sink's)."""
        self._jobs.append((tmp_dir, pid, frozenset((host, this_host()))))

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    def sweep(self, budget: int, live_pids: Container[int]) -> None:
        """Look at up to `budget` entries. A job whose pid a live worker has since been
        given is dropped: the files with that pid are its own, in use."""
        while self._jobs and budget > 0:
            tmp_dir, pid, hosts = self._jobs[0]
            if pid in live_pids:
                self._finish()
                continue
            if self._entries is None:
                try:
                    self._fd = open_maildir_tmp(tmp_dir)
                    self._entries = os.scandir(self._fd)
                except OSError as exc:
                    log.warning("cannot clean %s after worker %d: %s", tmp_dir, pid,
                                exc.strerror or exc)
                    self._finish()
                    continue
            try:
                for entry in self._entries:
                    budget -= 1
                    self._maybe_remove(entry, pid, hosts)
                    if budget <= 0:
                        return
            except OSError as exc:
                log.warning("cannot clean %s after worker %d: %s", tmp_dir, pid,
                            exc.strerror or exc)
            self._finish()

    def _maybe_remove(self, entry: os.DirEntry[str], pid: int, hosts: frozenset[str]) -> None:
        found = owner(entry.name)
        if found is not None and found[0] == pid and found[1] in hosts:
            self._removed += _remove(entry, self._fd, self._jobs[0][0])

    def _finish(self) -> None:
        tmp_dir, pid, _ = self._jobs.popleft()
        if self._entries is not None:
            self._entries.close()  # type: ignore[attr-defined]
            self._entries = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._removed:
            log.info("removed %d unfinished message file(s) of worker %d from %s",
                     self._removed, pid, tmp_dir)
        self._removed = 0
