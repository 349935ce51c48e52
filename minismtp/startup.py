"""What the master checks and prepares before serving, and a new worker does first:
the user to run as, the Maildir, crash reports.

Untrusted input: none (the validated configuration).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import pwd
import sys

from minismtp.config import Config, ConfigError, load_config
from minismtp.delivery import DeliveryError, make_backend

log = logging.getLogger("minismtp.master")


def check_user(user: str | None) -> None:
    if user and os.geteuid() == 0:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise LookupError(f'server.user: no such user "{user}"') from None


def drop_privileges(user: str | None) -> None:
    if not user or os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def prepare_delivery(config: Config) -> None:
    d = config.delivery
    make_backend(d.backend, d.path, d.fsync, d.layout, config.server.hostname).prepare()
    if d.backend == "maildir" and config.server.user and os.geteuid() == 0:
        user = pwd.getpwnam(config.server.user)
        for sub in ("", "tmp", "new", "cur"):  # per_recipient's root has only tmp/
            path = os.path.join(d.path, sub)
            if os.path.isdir(path):
                os.chown(path, user.pw_uid, user.pw_gid)


def load_for_reload(path: str | None, overrides: dict[str, object]) -> Config | None:
    """The configuration a HUP asks for, checked as far as can be without changing
    anything; None (each problem logged) if the reload is refused."""
    try:
        config = load_config(path, overrides)
        check_user(config.server.user)
        prepare_delivery(config)
        return config
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused: %s", problem)
    except (OSError, DeliveryError, LookupError) as exc:
        log.error("reload refused: %s", exc)
    log.error("reload refused: still running on the previous configuration")
    return None


def tmp_dir(config: Config) -> str | None:
    """The tmp/ where workers on `config` write messages being received (also with
    layout per_recipient); None when nothing is written."""
    delivery = config.delivery
    if delivery.backend != "maildir":
        return None
    return os.path.join(os.path.abspath(delivery.path), "tmp")


def report_where_stuck() -> None:
    """In a new worker: on SIGABRT (the master's, for a missed heartbeat) or a fatal
    signal, write every thread's Python traceback to the log, then die of it.
    faulthandler writes from the C signal handler, so it works even while the worker is
    blocked in a system call or looping without returning to the interpreter's loop."""
    faulthandler.enable(file=sys.stderr, all_threads=True)
