"""Workers that crash at start, for tests of a generation that cannot start.

A `sitecustomize` module for the server (support/sitehook.py): while the flag file
exists, a process forked by the master (a new worker) gets a `Worker.run` that raises at
once, as a worker hitting a bug in its set-up would (or sleeps first, then runs: a worker
slow to set up); only those serving the hostname written in the flag, if one is, and
only those at the place in their generation written after it, if one is. Nothing of it
is in the server's code: only the test's server process imports it.
"""

from __future__ import annotations

from pathlib import Path

from support.sitehook import site_env

_HOOK = '''\
import inspect
import os
import sys
import time

_FLAG = {flag!r}


def _maybe_crash_at_start():
    worker = sys.modules.get("minismtp.worker")
    try:
        with open(_FLAG) as flag:
            hostname, _, rest = flag.read().partition("\\n")
    except FileNotFoundError:
        return
    index, _, slow_s = rest.partition("\\n")
    init, run = worker.Worker.__init__, worker.Worker.run
    places = {{}}  # each Worker's place in its generation (its `index` argument)

    def note_place(self, *args, **kwargs):
        bound = inspect.signature(init).bind(self, *args, **kwargs)
        bound.apply_defaults()
        places[id(self)] = bound.arguments["index"]
        init(self, *args, **kwargs)

    def crash(self):
        if hostname and self.config.server.hostname != hostname:
            return run(self)
        if index and places[id(self)] != int(index):
            return run(self)
        if slow_s:
            time.sleep(float(slow_s))  # slow to set up, then as any worker
            return run(self)
        raise RuntimeError("crash at start (test hook)")

    worker.Worker.__init__ = note_place
    worker.Worker.run = crash


os.register_at_fork(after_in_child=_maybe_crash_at_start)
'''


class CrashHook:
    def __init__(self, tmp_path: Path) -> None:
        self.flag = tmp_path / "crash-at-start"
        self.env = site_env(tmp_path, _HOOK.format(flag=str(self.flag)))

    def on(self, hostname: str = "", index: int | None = None,
           slow_s: float | None = None) -> None:
        """Workers started from now on crash at start: those serving `hostname`, or all;
        of those, the one at `index` in its generation, or all. With `slow_s`, they sleep
        that long instead, then set up as usual."""
        fields = [hostname, "" if index is None else str(index),
                  "" if slow_s is None else str(slow_s)]
        self.flag.write_text("\n".join(fields).rstrip("\n"))

    def off(self) -> None:
        self.flag.unlink(missing_ok=True)
