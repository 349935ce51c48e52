"""What the master checks and prepares before serving, and a new worker does first:
the user to run as, the Maildir, crash reports.

Untrusted input: none (the validated configuration).
"""

from __future__ import annotations

import faulthandler
import grp
import logging
import os
import pwd
import stat
import sys
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import replace

from minismtp.config import Config, ConfigError, load_config
from minismtp.delivery import Backend, make_backend
from minismtp.delivery.maildir import SUBDIRS, MaildirBackend, subdir_problem
from minismtp.values import got

log = logging.getLogger("minismtp.master")

# Settings a reload cannot change: it keeps their running values, logged, and applies the
# rest (README "Reloading"; a test keeps the two in agreement). server.user: the master
# gives the Maildir to the workers' user, so a retiring generation of another user could
# not store during the overlap, and per_recipient mailboxes it made would stay its own.
RESTART_ONLY: frozenset[str] = frozenset({"server.user"})


def check_user(user: str | None) -> None:
    if user and os.geteuid() == 0:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise LookupError(f'server.user: no such user "{user}"') from None


def drop_privileges(user: str | None, group: str | None = None) -> None:
    """Become `user` (as root), with `group` (delivery.group) as its only supplementary
    group: outside it a worker could not give files to it, and the kernel would clear
    the set-group-ID bit of each directory it makes, so that what is made inside a new
    mailbox would get the user's own group, closed to the group's reader (Dovecot). The
    master keeps root: a reload's workers get the group their configuration names."""
    if not user or os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    os.setgroups([] if group is None else [grp.getgrnam(group).gr_gid])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def make_delivery(config: Config) -> Backend:
    """The configured backend, every delivery setting applied (in the master to check and
    prepare, in each worker to store)."""
    d = config.delivery
    return make_backend(d.backend, d.path, d.fsync, d.layout, config.server.hostname,
                        line_endings=d.line_endings,
                        envelope_recipients=d.envelope_recipients, group=d.group,
                        file_mode=d.file_mode, dir_mode=d.dir_mode)


def prepare_delivery(config: Config) -> None:
    d = config.delivery
    backend = make_delivery(config)
    backend.prepare()
    if isinstance(backend, MaildirBackend) and config.server.user and os.geteuid() == 0:
        user = pwd.getpwnam(config.server.user)
        backend.give_to(user.pw_uid, grp.getgrnam(d.group).gr_gid if d.group else user.pw_gid)


def load_for_reload(path: str | None, overrides: dict[str, object],
                    running: Config) -> Config | None:
    """The configuration a HUP asks for, with the running value of each RESTART_ONLY key,
    checked as far as can be without changing anything: nothing on disk changes until
    the master commits the reload (prepare_delivery). None (each problem logged) if the
    reload is refused."""
    try:
        config = load_config(path, overrides)
        check_user(config.server.user)
    except ConfigError as exc:
        problems = exc.problems
    except LookupError as exc:
        problems = [str(exc)]
    else:
        problems = delivery_problems(config, serving=True)  # as a start would find it
        if not problems:
            kept = keep_restart_only(config, running)
            if kept is not config:  # and as the workers started now, of the old user, will
                problems = delivery_problems(kept, serving=True)
            config = kept
        if not problems:
            return config
    for problem in problems:
        log.error("reload refused: %s", problem)
    log.error("reload refused: still running on the previous configuration")
    return None


def keep_restart_only(config: Config, running: Config) -> Config:
    """`config` with the running value of each RESTART_ONLY key it would change (logged)."""
    for name in sorted(RESTART_ONLY):
        section_name, key = name.split(".")
        section = getattr(config, section_name)
        kept = getattr(getattr(running, section_name), key)
        if getattr(section, key) != kept:
            log.error("reload: %s stays %s until a restart", name, got(kept))
            config = replace(config, **{section_name: replace(section, **{key: kept})})
    return config


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


def delivery_problems(config: Config, *, serving: bool = False) -> list[str]:
    """What keeps the workers (as server.user, else as this user) from storing: a
    delivery.path that is a file or below one, a group that does not exist, a
    delivery.path they cannot reach or write. Checked from the file system's modes, since
    trying as that user would need the master to change identity. check-config asks
    about server.user whoever runs it; `serving`, only when it applies (as root). This
    user's own access is a problem only `serving` (check-config may run as someone else
    than the service will: delivery_warnings says it there)."""
    d = config.delivery
    if d.backend != "maildir":
        return []
    problems = []
    # Refused whoever runs: the master never follows a symlink in place of tmp/, new/ or
    # cur/ (maildir.open_subdir); said here so that a reload is refused before anything.
    root = os.path.abspath(d.path)
    if problem := _root_problem(root):  # nothing below it to check
        return [f'delivery.path "{root}": {problem}', *_group_problems(d.group)]
    for sub in SUBDIRS[d.layout]:
        if problem := subdir_problem(root, sub):
            problems.append(f'delivery.path "{root}": {problem}')
    # Without server.user the workers store as this user (so do they when not root).
    if serving and not problems and (problem := _own_access(config)):
        problems.append(f'delivery.path "{root}": {problem}')
    problems.extend(_group_problems(d.group))
    if config.server.user and (not serving or os.geteuid() == 0):
        try:
            user = pwd.getpwnam(config.server.user)
        except KeyError:
            return [*problems, f'server.user: no such user "{config.server.user}"']
        problem = _unreachable(os.path.abspath(d.path), user, d.group)
        if problem:
            problems.append(f'delivery.path: server.user "{user.pw_name}" {problem}')
    return problems


def _group_problems(group: str | None) -> list[str]:
    if group is None:
        return []
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return [f'delivery.group: no such group "{group}"']
    # As root the master makes the directories with the group (set-group-ID, so
    # whatever the workers make inherits it); otherwise this user must be in it.
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        return [f'delivery.group: this user is not in group "{group}", '
                "so cannot give it the files (run as root, or join it)"]
    return []


def _root_problem(root: str) -> str | None:
    """Why the Maildir's root can be neither used nor made whoever runs: a file in its
    place, or in place of a directory above it."""
    try:
        st = os.stat(root)  # following a symlink: the root may be one
    except NotADirectoryError:
        return f'"{_file_above(root)}" is not a directory'
    except OSError:
        return None  # missing (made at start), or for the access checks to explain
    return None if stat.S_ISDIR(st.st_mode) else "not a directory"


def _file_above(path: str) -> str:
    """The highest directory named above `path` that is something else."""
    for above in _above(path):
        if os.path.exists(above) and not os.path.isdir(above):
            return above
    return os.path.dirname(path)


def _above(path: str) -> Iterator[str]:
    """The directories an absolute `path` names above itself, from the root down."""
    parts = path.split(os.sep)
    for depth in range(1, len(parts)):
        yield os.sep.join(parts[:depth]) or os.sep


def _own_access(config: Config) -> str | None:
    """Why this user could not store (it stores itself: no server.user, or not root)."""
    if config.server.user and os.geteuid() == 0:
        return None
    return _own_access_problem(os.path.abspath(config.delivery.path), config.delivery.layout)


def _own_access_problem(root: str, layout: str) -> str | None:
    """Why this process's user could not make or write the Maildir at `root`, judged by
    os.access (its real ids, which are the effective ones here): the nearest existing
    directory when the root is missing, else the root when something is to be made in
    it, tmp/ and, in layout single, new/ when they exist."""
    who = _this_user()
    existing = root
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if existing != root:
        if not os.access(existing, os.W_OK | os.X_OK):
            return f'{who} cannot create it: may not write in "{existing}"'
        return None
    subs = [sub for sub in ("tmp", "new") if sub in SUBDIRS[layout]]
    if (layout == "per_recipient" or not all(os.path.isdir(os.path.join(root, sub))
                                            for sub in subs)) \
            and not os.access(root, os.W_OK | os.X_OK):
        return f"{who} may not write in it"
    for sub in subs:
        path = os.path.join(root, sub)
        if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
            return f"{who} may not write in its {sub}/"
    return None


def _this_user() -> str:
    try:
        return f'this user ("{pwd.getpwuid(os.geteuid()).pw_name}")'
    except KeyError:
        return f"this user (uid {os.geteuid()})"


def delivery_warnings(config: Config) -> list[str]:
    """What check-config says of a configuration delivery_problems passes, without
    failing: this user could not store, which serve refuses if it runs as this user; and
    what keeps a reader in delivery.group out."""
    if config.delivery.backend != "maildir":
        return []
    own = []
    if problem := _own_access(config):
        own.append(f'delivery.path "{os.path.abspath(config.delivery.path)}": {problem} '
                   "(serve and a reload refuse it when run as this user)")
    return own + _group_warnings(config)


def _group_warnings(config: Config) -> list[str]:
    """What keeps a reader in delivery.group (Dovecot's mail user) out of an existing
    Maildir, although minismtp itself can store: in layout "single" the root, new/ and
    cur/ that the group may not read, write and search (a reader moves messages from new/
    to cur/, and Dovecot keeps its own files in the root); in "per_recipient" a root it
    may not search. Not problems: the reader may get in otherwise (as the owner, root, an
    ACL)."""
    d = config.delivery
    if d.backend != "maildir" or d.group is None:
        return []
    try:
        gid = grp.getgrnam(d.group).gr_gid
    except KeyError:
        return []  # a problem, reported by delivery_problems
    # As root with server.user the master gives these directories the group at start
    # (prepare_delivery), keeping their modes; otherwise they keep the group they have.
    given = os.geteuid() == 0 and bool(config.server.user)
    root = os.path.abspath(d.path)
    # per_recipient: a reader only passes through the root, to <domain>/<local-part>/.
    subs = ("",) if d.layout == "per_recipient" else ("", "new", "cur")
    needed, fix = (0o1, "g+xs") if d.layout == "per_recipient" else (0o7, "g+rwxs")
    warnings = []
    for sub in subs:
        path = os.path.join(root, sub) if sub else root
        try:
            st = os.stat(path)
        except OSError:
            continue  # made at start, with dir_mode and the group
        if not stat.S_ISDIR(st.st_mode):
            continue  # a problem at start
        mode = stat.S_IMODE(st.st_mode)
        in_group = st.st_gid == gid or given
        if (in_group and (mode >> 3) & needed == needed) or mode & needed == needed:
            continue
        warnings.append(f'delivery.group: "{path}" is closed to group "{d.group}" (mode '
                        f"{mode:04o}, group {_group_name(st.st_gid)}), so a reader in it "
                        f"cannot get in: chgrp {d.group} and chmod {fix} it")
    return warnings


def _group_name(gid: int) -> str:
    try:
        return f'"{grp.getgrgid(gid).gr_name}"'
    except KeyError:
        return str(gid)


def _unreachable(path: str, user: pwd.struct_passwd, group: str | None) -> str | None:
    """Why `user` could not get to `path` (a directory above it it may not search), or
    None. The Maildir's own directories are no obstacle: the master, as root, makes them
    and gives them to the user at start. The worker's groups are those drop_privileges
    gives it: the user's own and `group` (delivery.group), not those /etc/group lists."""
    if user.pw_uid == 0:
        return None
    gids = {user.pw_gid}
    if group:
        with suppress(KeyError):  # no such group: a problem said on its own
            gids.add(grp.getgrnam(group).gr_gid)
    for above in _above(path):
        try:
            st = os.stat(above)
        except OSError:
            return None  # made by the master at start
        shift = 6 if st.st_uid == user.pw_uid else 3 if st.st_gid in gids else 0
        if not (st.st_mode >> shift) & 1:
            return (f'cannot reach "{path}": "{above}" is mode {stat.S_IMODE(st.st_mode):04o}'
                    f", owner {st.st_uid}, group {st.st_gid}")
    return None
