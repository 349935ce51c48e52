"""Maildir delivery: tmp/ -> new/, and a 250 reply only once the message is on disk.

Untrusted input (SECURITY): the HELO name, sender, recipients and body come from the client.
The envelope strings reach headers and directory names only through untrusted.py (control
characters replaced, path components percent-encoded); a recipient's directory is then
checked with realpath to lie inside delivery.path (a symlink planted in the tree is
refused, not followed). The body is written as the core hands it on.

Files follow the Maildir convention: lines end in LF (delivery.line_endings "lf"; "crlf"
keeps the wire form). The conversion is done in C per written piece (`to_lf`), which
is exact because no CRLF is ever split between two writes: scanner.py guarantees
it for body pieces, and the trace headers are one write (so they follow the setting).

Modes and group (delivery.file_mode, dir_mode, group), so that a reader running as
another user (Dovecot's mail user) can read while nobody else can: files are made with
file_mode and directories with dir_mode, set with fchmod/chmod when they grant more than
the owner's bits, so the umask cannot narrow them. With a group, every directory made
here gets it and the set-group-ID bit, so what is made inside inherits the group without
any chown, and files are also given it with fchown where the process may (root or a
member of the group); elsewhere the directory's bit does it. A worker running as
server.user has delivery.group as its supplementary group (startup.drop_privileges):
outside it, the kernel would silently clear the bit when it sets a directory's mode,
and what is made inside would get the user's own group. A directory made without the
group or the bit is logged, naming it (`_check_group`).

Who sees the envelope recipients (delivery.envelope_recipients): "all" writes a
`Delivered-To:` per recipient, "one" only for a message to exactly one recipient (so a
Bcc recipient never shows to the others reading the same mailbox), "none" never, and
then the `Received:` header has no "for" clause either.

Layout "single" uses the Maildir at delivery.path; "per_recipient" writes one file in the
shared `<path>/tmp/` and hard-links it into each `<path>/<domain>/<local-part>/new/`. The
copies are one file, so a message to several recipients carries no `Delivered-To:` lines
there (each would show every recipient, Bcc too); the mailbox it sits in is the record.

Mailboxes are made at commit, for a message being stored, never when DATA starts: a
transaction abandoned before its end leaves no directory behind, and the mkdirs and their
fsyncs run where commits run, off the event loop (`commit_blocks` is always true for this
layout). One message makes at most MAX_NEW_MAILBOXES of them; past that it gets a
temporary error and keeps those made, so the client's retry goes on where it stopped.
This bounds the stall a fresh recipient list costs the other messages of its worker.

The master (root, with server.user) prepares the Maildir that the workers' user owns, who
could put a symlink where tmp/, new/ or cur/ was, for root to chown, clean or write in its
target: the master reaches them only through descriptors opened without following one
(`open_subdir`), and refuses such a Maildir. delivery.path itself is followed (the
operator's), and so is everything by the workers, who can reach only what their user may.

Commit follows CPython's `Maildir.add` and goes further: fsync the file, link it into new/
(never clobbers), unlink the tmp name, fsync the new/ directory so the entry survives a
crash. Any failure removes every name the message got.
"""

from __future__ import annotations

import errno
import grp
import itertools
import logging
import os
import re
import socket
import stat
import time
from contextlib import suppress

from ..smtp.events import Envelope
from .base import Backend, DeliveryError, Peer, Sink
from .untrusted import encode_host, mailbox_parts, trace_headers

__all__ = ["SUBDIRS", "MaildirBackend", "MaildirSink", "clean_tmp", "open_maildir_tmp",
           "open_subdir", "subdir_problem"]

log = logging.getLogger("minismtp.delivery")

TMP_MAX_AGE_S = 36 * 3600  # Maildir convention: tmp/ files this old are debris of a crash
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# What the master makes in the root, per layout (per_recipient: workers make mailboxes).
SUBDIRS = {"single": ("tmp", "new", "cur"), "per_recipient": ("tmp",)}
_IS_LINK = "is a symbolic link (refused: not followed)"
_NOT_A_DIRECTORY = "is not a directory"
_NO_LINK = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})  # fs without hard links
_MAX_MAILBOXES = 4096  # verified mailbox directories remembered per process
# New mailboxes one message may make (layout "per_recipient"): each costs 5 mkdirs and up
# to 3 directory fsyncs on the commit thread, which the worker's other commits wait for.
# 100 is what RFC 5321 4.5.3.1.8 says a server must take per message, so any list of up
# to 100 fresh recipients is stored at once; a longer one, over as many retries as needed.
MAX_NEW_MAILBOXES = 100

# Unique names: <seconds>.M<usec>P<pid>Q<counter>.<host>. The pid is cached and refreshed
# in each forked child; the counter makes names distinct within one process and microsecond.
_pid = os.getpid()
_counter = itertools.count(1)


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


# --- file system helpers -----------------------------------------------------------------


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _unlink_quietly(path: str | None) -> None:
    if path is not None:
        with suppress(OSError):
            os.unlink(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    except OSError as exc:
        exc.filename = path  # so the log names the directory, not the message
        raise
    finally:
        os.close(fd)


def _mkdir(path: str, fsync: bool, mode: int = 0o700, gid: int = -1) -> bool:
    """Create one directory if missing, with `mode` (and group `gid` with its set-group-ID
    bit, if given); make its entry durable when created (unless the caller does that
    itself, `fsync` False). True if it was created."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", path) from None
        return False
    _set_owner(path, mode, gid)
    if fsync:
        _fsync_dir(os.path.dirname(path))
    return True


_find_bare_cr = re.compile(rb"\r(?!\n)").search
_LF_STRETCH = 65536  # LF storage converts and writes at most this much at a time
_CR = 13
# How a message's first line begins: a field name (printable ASCII but ":", RFC 5322
# 3.6.8), then blanks (the obsolete syntax allows them before the colon).
_FIELD_NAME = re.compile(rb"([!-9;-~]*)[ \t]*").match
_COLON = 0x3A
_LINE_BYTES = 1000  # RFC 5322 2.1.1: no header line is longer (CRLF included)


def _write_all(fd: int, data: memoryview | bytes) -> None:
    n = os.write(fd, data)
    while n < len(data):
        # Short write: go on with the remainder, a view of the same memory (no copy).
        if n == 0:
            raise OSError(errno.ENOSPC, "no progress writing")
        data = memoryview(data)[n:]
        n = os.write(fd, data)


def to_lf(data: memoryview | bytes) -> bytes:
    """`data` with each CRLF made LF, in C. No CRLF straddles two writes (see the module
    docstring), so none is missed at a piece's edge. With no bare CR in the piece (the
    usual case; a regex search that jumps from CR to CR), deleting every CR is the same:
    `replace` of one byte by nothing runs memchr from CR to CR, several times faster than
    `translate` (a per-byte table) or than replacing CRLF (bench/README.md)."""
    if _find_bare_cr(data) is None:
        return bytes(data).replace(b"\r", b"")
    return bytes(data).replace(b"\r\n", b"\n")


def _may_chgrp(gid: int) -> bool:
    """Whether this process may give its files to group `gid` (root, or a member)."""
    return gid >= 0 and (os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups())


def _set_owner(path: str | int, mode: int, gid: int, name: str | None = None) -> None:
    """A directory just made (0700), by its path or open on a descriptor (then `name`
    names it): its group, where the process may, then `mode`."""
    if gid >= 0:
        if _may_chgrp(gid):
            os.chown(path, -1, gid)
        mode |= stat.S_ISGID  # what is made inside gets the group, by any user
    if mode != 0o700:
        os.chmod(path, mode)
    if gid >= 0:
        _check_group(path, gid, name or str(path))


def _check_group(path: str | int, gid: int, name: str) -> None:
    """Log a directory that did not get group `gid` or its set-group-ID bit: the kernel
    clears the bit without an error, and the group's reader (Dovecot) would find what is
    made inside closed to it, with nothing said anywhere."""
    st = os.stat(path)
    if st.st_gid == gid and st.st_mode & stat.S_ISGID:
        return
    log.error('delivery: directory "%s" has group %d and mode %04o, not group %d with '
              "the set-group-ID bit: what is made in it is closed to delivery.group "
              "(is the process in that group?)", name, st.st_gid, stat.S_IMODE(st.st_mode),
              gid)


def _give(fd: int, uid: int, gid: int) -> None:
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.fchown(fd, uid, gid)
    os.fchmod(fd, mode)  # the set-group-ID bit may not survive chown


def open_subdir(root_fd: int, name: str) -> int:
    """Open the directory `name` (tmp/, new/, cur/) of the Maildir open on `root_fd`,
    never through a symlink. With server.user the workers' user owns the root, so it may
    replace tmp/ by a symlink; the root master, following it, would clean, chown or write
    in the target (/etc, say). NotADirectoryError, with a reason, when `name` is a symlink
    or not a directory."""
    try:
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=root_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):  # a symlink: either, by flags
            raise
        try:
            why = _refusal(os.stat(name, dir_fd=root_fd, follow_symlinks=False).st_mode)
        except OSError:
            why = None
        raise NotADirectoryError(exc.errno, why or _NOT_A_DIRECTORY, name) from None


def _refusal(mode: int) -> str | None:
    """Why an entry of `mode` (not followed) cannot be tmp/, new/ or cur/, or None."""
    if stat.S_ISLNK(mode):
        return _IS_LINK
    if not stat.S_ISDIR(mode):
        return _NOT_A_DIRECTORY
    return None


def open_maildir_tmp(tmp_dir: str) -> int:
    """A Maildir's tmp/ opened by its path (`<root>/tmp`): the root followed wherever it
    points, tmp/ itself never (see `open_subdir`)."""
    root_fd = os.open(os.path.dirname(tmp_dir.rstrip(os.sep)), _DIR_FLAGS)
    try:
        return open_subdir(root_fd, os.path.basename(tmp_dir.rstrip(os.sep)))
    finally:
        os.close(root_fd)


def subdir_problem(path: str, sub: str) -> str | None:
    """Why the existing `sub` of the Maildir at `path` cannot be used (a symlink, not a
    directory), or None (a directory, or missing: made at start)."""
    try:
        why = _refusal(os.lstat(os.path.join(path, sub)).st_mode)
    except OSError:
        return None
    return None if why is None else f"{sub}/ {why}"


def clean_tmp(tmp: str | int, max_age_s: float = TMP_MAX_AGE_S) -> int:
    """Remove files older than `max_age_s` (by mtime) from a Maildir's tmp/: `tmp` is
    the Maildir's path, or its tmp/ open as a descriptor (`open_subdir`).

    Returns how many were removed. Directories are left alone; OSError other than a file
    vanishing meanwhile propagates.
    """
    if isinstance(tmp, str):
        fd = open_maildir_tmp(os.path.join(tmp, "tmp"))
        try:
            return clean_tmp(fd, max_age_s)
        finally:
            os.close(fd)
    cutoff = time.time() - max_age_s
    removed = 0
    with os.scandir(tmp) as entries:  # names relative to `tmp`: nothing is followed
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) or st.st_mtime >= cutoff:
                    continue
                os.unlink(entry.name, dir_fd=tmp)
            except FileNotFoundError:
                continue
            removed += 1
    return removed


# --- sink and backend ----------------------------------------------------------------------


class MaildirSink(Sink):
    """One message in tmp/. `_fd < 0` means finished: committed, aborted or failed."""

    __slots__ = ("_backend", "_fd", "_tmp_path", "_name", "queue_id", "_mailboxes",
                 "_targets", "_linked", "_lf", "_at_body", "_held")

    def __init__(self, backend: MaildirBackend, fd: int, tmp_path: str, name: str,
                 queue_id: str, mailboxes: tuple[tuple[str, str], ...]) -> None:
        self._backend = backend
        self._fd = fd
        self._tmp_path: str | None = tmp_path
        self._name = name
        self.queue_id = queue_id
        self._mailboxes = mailboxes  # per_recipient: (domain, local part) folders, distinct
        self._targets: tuple[str, ...] = ()  # their new/ directories, once made at commit
        self._linked: list[str] = []  # its names in new/ once committed
        self._lf = backend.line_endings == "lf"
        self._at_body = False  # the next write is the message's first bytes (see open)
        self._held = b""  # those first bytes, while they cannot tell (_begin_body)

    def write(self, data: memoryview | bytes) -> None:
        fd = self._fd
        if fd < 0:
            return
        if self._at_body and data:
            data = self._begin_body(data)
            if not data:
                return
        try:
            if not self._lf:
                _write_all(fd, data)
                return
            # Converted a stretch at a time: two copies of a whole 256 KiB read (the
            # piece, then without its CRs) are each big enough for malloc to map fresh
            # pages and give them back, page faults that cost more than the conversion
            # itself; stretches this size reuse the same memory. A stretch never ends in
            # a CR, so no CRLF is split between two conversions.
            view = memoryview(data)
            start, end = 0, len(view)
            while start < end:
                stop = start + _LF_STRETCH
                if stop >= end:
                    stop = end
                elif view[stop - 1] == _CR:
                    stop -= 1
                _write_all(fd, to_lf(view[start:stop]))
                start = stop
        except OSError as exc:
            path = self._tmp_path
            self.abort()
            raise DeliveryError(f'delivery: writing "{path}": {_why(exc)}', exc.errno) from exc

    def _begin_body(self, data: memoryview | bytes) -> memoryview | bytes:
        """The message's first bytes, to write now (b"" while they cannot tell).

        Unless the message begins with a header field or with the empty line that ends
        the header section, an empty line goes first, as Postfix writes: a first line
        beginning with a space or tab would continue our last trace header (RFC 5322
        2.2.3), letting the client write into it, and a first line that is no field
        (a message without a header) would be read as part of the header section.
        """
        if self._held:
            data = self._held + bytes(data)  # a few bytes, once per message at most
        first = data[0]
        if first == 10 or first == 13:  # the empty line, a message without a header?
            begins_header: bool | None = (
                True if first == 10 or data[1:2] == b"\n" else None if len(data) == 1 else False)
        else:
            name = _FIELD_NAME(data, 0, _LINE_BYTES)
            end = name.end()
            if end >= _LINE_BYTES:
                begins_header = False  # longer than a header line can be
            elif end < len(data):
                begins_header = data[end] == _COLON and name.end(1) > 0
            else:  # a field name so far: the next piece tells
                begins_header = None
        if begins_header is None:
            self._held = bytes(data)
            return b""
        self._at_body = False
        self._held = b""
        if not begins_header:
            self.write(b"\r\n")  # as LF too, with line_endings: lf
        return data

    def commit(self, sync_dirs: bool = True) -> str:
        """Store the message; with `sync_dirs` False the caller fsyncs `new_dirs` itself."""
        if self._held:  # the body ended inside what looked like a field name: body it is
            held, self._held = self._held, b""
            self._at_body = False
            self.write(b"\r\n")
            self.write(held)
        fd = self._fd
        if fd < 0:
            raise DeliveryError(f"delivery: {self.queue_id} not stored (write failed or aborted)")
        self._fd = -1
        tmp_path = self._tmp_path
        assert tmp_path is not None
        linked: list[str] = []
        try:
            try:
                if self._backend.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if self._mailboxes:
                self._targets = self._backend._make_mailboxes(self._mailboxes)
            self._backend._publish(tmp_path, self._name, self._targets, linked, sync_dirs)
        except (OSError, DeliveryError) as exc:
            for path in linked:
                _unlink_quietly(path)
            self._tmp_path = None
            _unlink_quietly(tmp_path)
            if isinstance(exc, DeliveryError):
                raise
            # The path that failed: for link() the new name (filename2), not the tmp file.
            where = exc.filename2 or exc.filename or tmp_path
            raise DeliveryError(f'delivery: storing "{where}": {_why(exc)}',
                                exc.errno) from exc
        self._tmp_path = None
        self._linked = linked
        return self.queue_id

    def unpublish(self) -> None:
        """Take a committed message back out of new/ (its directory could not be synced)."""
        for path in self._linked:
            _unlink_quietly(path)
        self._linked = []

    @property
    def new_dirs(self) -> tuple[str, ...]:
        return self._targets or (self._backend._new,)

    def abort(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with suppress(OSError):
                os.close(fd)
        tmp_path, self._tmp_path = self._tmp_path, None
        _unlink_quietly(tmp_path)


def this_host() -> str:
    """This host's name as the sink writes it into file names (the master's debris
    sweeper matches it)."""
    return encode_host(socket.gethostname())


class MaildirBackend(Backend):
    """Stores messages as Maildir files under `path` (see the module docstring)."""

    __slots__ = ("path", "fsync", "per_recipient", "hostname", "_host", "_tmp", "_new",
                 "_new_fd", "_new_id", "_real_root", "_mailboxes", "line_endings",
                 "envelope_recipients", "file_mode", "dir_mode", "gid", "_chgrp_files")

    def __init__(self, path: str, fsync: bool = True, layout: str = "single",
                 hostname: str = "", *, line_endings: str = "lf",
                 envelope_recipients: str = "one", group: str | None = None,
                 file_mode: int = 0o600, dir_mode: int = 0o700) -> None:
        if layout not in ("single", "per_recipient"):
            raise ValueError(f"unknown Maildir layout {layout!r}")
        if line_endings not in ("lf", "crlf"):
            raise ValueError(f"unknown line endings {line_endings!r}")
        if envelope_recipients not in ("all", "one", "none"):
            raise ValueError(f"unknown envelope_recipients {envelope_recipients!r}")
        self.line_endings = line_endings
        self.envelope_recipients = envelope_recipients
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.gid = -1
        if group is not None:
            try:
                self.gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise DeliveryError(f'delivery.group: no such group "{group}"') from None
        self._chgrp_files = _may_chgrp(self.gid)  # per process: made after privileges drop
        self.path = os.path.abspath(path)
        self.fsync = fsync
        self.per_recipient = layout == "per_recipient"
        self.hostname = hostname or socket.gethostname()
        self._host = this_host()
        self._tmp = os.path.join(self.path, "tmp", "")
        self._new = os.path.join(self.path, "new", "")
        self._new_fd = -1
        self._new_id = (0, 0)  # st_dev, st_ino of the directory _new_fd is open on
        self._real_root: str | None = None
        self._mailboxes: dict[tuple[str, str], str] = {}

    def _path_error(self, reason: str) -> DeliveryError:
        return DeliveryError(f'delivery.path "{self.path}": {reason}')

    def prepare(self) -> None:
        """Make the Maildir ready, in the master. Through descriptors: the root is opened
        following a symlink (delivery.path is the operator's to point anywhere), tmp/,
        new/ and cur/ never (see `open_subdir`)."""
        root_fd = self._open_root()
        subs: dict[str, int] = {}
        try:
            for sub in self.subdirs:
                try:
                    subs[sub] = self._make_subdir(root_fd, sub)
                except OSError as exc:
                    raise self._path_error(f"cannot create {sub}/: {_why(exc)}") from exc
            try:
                clean_tmp(subs["tmp"])
            except OSError as exc:
                raise self._path_error(f"cannot clean tmp/: {_why(exc)}") from exc
            self._probe(subs["tmp"], root_fd)
        finally:
            for fd in subs.values():
                os.close(fd)
            os.close(root_fd)
        self._real_root = os.path.realpath(self.path)

    @property
    def subdirs(self) -> tuple[str, ...]:
        return SUBDIRS["per_recipient" if self.per_recipient else "single"]

    def _open_root(self) -> int:
        path = self.path
        if not os.path.isdir(path):
            if os.path.lexists(path):
                raise self._path_error("not a directory")
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                _mkdir(path, False, self.dir_mode, self.gid)
            except OSError as exc:
                raise self._path_error(f"cannot create: {_why(exc)}") from exc
        try:
            return os.open(path, _DIR_FLAGS)
        except OSError as exc:
            raise self._path_error(f"cannot open: {_why(exc)}") from exc

    def _make_subdir(self, root_fd: int, sub: str) -> int:
        """`sub` of the root opened (see `open_subdir`), made first if missing."""
        try:
            os.mkdir(sub, 0o700, dir_fd=root_fd)
        except FileExistsError:
            pass  # what it is, open_subdir finds out
        else:
            fd = open_subdir(root_fd, sub)
            try:
                _set_owner(fd, self.dir_mode, self.gid, os.path.join(self.path, sub))
                if self.fsync:
                    os.fsync(root_fd)
            except BaseException:
                os.close(fd)  # the caller closes only what it is given
                raise
            return fd
        try:
            return open_subdir(root_fd, sub)
        except NotADirectoryError as exc:
            raise self._path_error(f"{sub}/ {exc.strerror}") from None

    def give_to(self, uid: int, gid: int) -> None:
        """The root and `subdirs` to `uid` and group `gid`, modes kept (as root, for
        server.user). Through descriptors, as in prepare(): the workers' user owns the
        root, so it may have put a symlink where tmp/ was, for root to give away its
        target (/etc) instead."""
        root_fd = self._open_root()
        try:
            _give(root_fd, uid, gid)
            for sub in self.subdirs:
                try:
                    fd = open_subdir(root_fd, sub)
                except NotADirectoryError as exc:
                    raise self._path_error(f"{sub}/ {exc.strerror}") from None
                try:
                    _give(fd, uid, gid)
                finally:
                    os.close(fd)
        finally:
            os.close(root_fd)

    def _probe(self, tmp_fd: int, root_fd: int) -> None:
        """Prove tmp/ is writable (and supports hard links when the layout needs them)."""
        probe = f".probe.{os.getpid()}"
        with suppress(OSError):
            os.unlink(probe, dir_fd=tmp_fd)
        try:
            fd = os.open(probe, _OPEN_FLAGS | os.O_NOFOLLOW, 0o600, dir_fd=tmp_fd)
            try:
                os.write(fd, b"probe\n")
            finally:
                os.close(fd)
            if self.per_recipient:
                os.link(probe, probe + ".link", src_dir_fd=tmp_fd, dst_dir_fd=tmp_fd)
                os.unlink(probe + ".link", dir_fd=tmp_fd)
        except OSError as exc:
            raise self._path_error(f"not writable: {_why(exc)}") from exc
        finally:
            with suppress(OSError):
                os.unlink(probe, dir_fd=tmp_fd)
        if not self.per_recipient and not os.access("new", os.W_OK | os.X_OK, dir_fd=root_fd):
            raise self._path_error("new/ is not writable")

    def open(self, envelope: Envelope, peer: Peer, hostname: str | None = None) -> MaildirSink:
        # Only names here (no system call): the mailboxes are made by commit().
        mailboxes = self._mailbox_names(envelope.recipients) if self.per_recipient else ()
        for _ in range(5):  # an O_EXCL clash needs a pid reused within one microsecond
            seconds, rest_ns = divmod(time.time_ns(), 1_000_000_000)
            queue_id = f"{seconds}.M{rest_ns // 1000}P{_pid}Q{next(_counter)}"
            name = f"{queue_id}.{self._host}"
            tmp_path = self._tmp + name
            try:
                fd = os.open(tmp_path, _OPEN_FLAGS, 0o600)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise DeliveryError(f'delivery: creating "{tmp_path}": {_why(exc)}',
                                    exc.errno) from exc
        else:
            raise DeliveryError(f'delivery: no unique name in "{self._tmp}"')
        sink = MaildirSink(self, fd, tmp_path, name, queue_id, mailboxes)
        try:
            if self._chgrp_files:
                os.fchown(fd, -1, self.gid)
            if self.file_mode != 0o600:
                os.fchmod(fd, self.file_mode)
        except OSError as exc:
            sink.abort()
            raise DeliveryError(f'delivery: setting group or mode of "{tmp_path}": '
                                f"{_why(exc)}", exc.errno) from exc
        recipients = envelope.recipients
        record = self.envelope_recipients
        # per_recipient: one file shared by every recipient's mailbox can name at most a
        # sole recipient, whatever the setting.
        if record == "none" or (len(recipients) > 1 and (record == "one" or self.per_recipient)):
            delivered_to: tuple[str, ...] = ()
        else:
            delivered_to = recipients
        # Written whole through write(), so they get the file's line endings too.
        sink.write(trace_headers(envelope, peer, hostname or self.hostname, queue_id, seconds,
                                 delivered_to, for_clause=record != "none"))
        sink._at_body = True
        return sink

    @staticmethod
    def _mailbox_names(recipients: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        """The distinct (domain, local part) folders of the recipients, in order."""
        if not recipients:
            raise DeliveryError("delivery: no recipients to store for")
        return tuple(dict.fromkeys(mailbox_parts(rcpt) for rcpt in recipients))

    def _make_mailboxes(self, mailboxes: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
        """The new/ directories of `mailboxes`, made where missing (at commit, off the
        loop): at most MAX_NEW_MAILBOXES per call, each directory made durable before
        this returns, every parent fsynced once however many entries it gained (also
        those found made, at this worker's first use: see `_make_mailbox`)."""
        targets: list[str] = []
        parents: set[str] = set()  # directories that gained an entry
        made = 0
        try:
            for parts in mailboxes:
                new_dir = self._mailboxes.get(parts)
                if new_dir is None:
                    if made >= MAX_NEW_MAILBOXES:
                        raise DeliveryError(
                            f"delivery: message needs more than {MAX_NEW_MAILBOXES} new "
                            f"mailboxes; made {made}, the rest when the client retries")
                    new_dir, created = self._make_mailbox(parts, parents)
                    made += created
                targets.append(new_dir)
        finally:
            if self.fsync:  # also after a failure: what was made stays, made durable
                for parent in parents:
                    _fsync_dir(parent)
        return tuple(targets)

    def _make_mailbox(self, parts: tuple[str, str], parents: set[str]) -> tuple[str, bool]:
        """One mailbox's new/ directory and whether anything had to be made for it; the
        directories on its way are added to `parents` (to be fsynced)."""
        if self._real_root is None:
            self._real_root = os.path.realpath(self.path)
        inside = self._real_root + os.sep
        mailbox = os.path.join(self.path, *parts)
        outside = DeliveryError(f'delivery: mailbox "{mailbox}" lies outside delivery.path')
        # Checked before creating (a planted symlink must not be followed by mkdir) and
        # after (the directories now exist, so realpath sees every link on the way).
        if not os.path.realpath(mailbox).startswith(inside):
            raise outside
        created = False
        try:
            for path in (os.path.join(self.path, parts[0]), mailbox,
                         *(os.path.join(mailbox, sub) for sub in ("tmp", "new", "cur"))):
                if _mkdir(path, False, self.dir_mode, self.gid):
                    created = True
                # Its parent is synced at this worker's first use of the mailbox, made
                # here or not: another worker may have made the entry a moment ago and
                # not synced it yet, and a 250 must not rest on its sync to come.
                parents.add(os.path.dirname(path))
        except OSError as exc:
            raise DeliveryError(f'delivery: creating "{exc.filename or mailbox}": '
                                f"{_why(exc)}", exc.errno) from exc
        if not os.path.realpath(mailbox).startswith(inside):
            raise outside
        if len(self._mailboxes) >= _MAX_MAILBOXES:
            self._mailboxes.clear()
        self._mailboxes[parts] = new_dir = os.path.join(mailbox, "new", "")
        return new_dir, created

    def _publish(self, tmp_path: str, name: str, targets: tuple[str, ...],
                 linked: list[str], sync_dirs: bool = True) -> None:
        """Give the closed tmp file its name(s) in new/; append each to `linked` at once."""
        if not self.per_recipient:
            new_path = self._new + name
            try:
                os.link(tmp_path, new_path)
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise
                os.rename(tmp_path, new_path)  # CPython Maildir.add's fallback
                linked.append(new_path)
            else:
                linked.append(new_path)
                os.unlink(tmp_path)
            if self.fsync and sync_dirs:
                self._sync_new()
            return
        try:
            for new_dir in targets:
                os.link(tmp_path, new_dir + name)
                linked.append(new_dir + name)
            os.unlink(tmp_path)
            if self.fsync and sync_dirs:
                for new_dir in targets:
                    _fsync_dir(new_dir)
        except OSError:
            self._mailboxes.clear()  # a mailbox may have been removed: re-create next time
            raise

    def _sync_new(self) -> None:
        """fsync new/, through a descriptor kept until close(), once a batch. The entries
        were linked by path, into the new/ there now: the operator may have replaced
        the Maildir (moved aside and made afresh, a delivery.path symlink switched), so
        the descriptor is checked to be that directory still (one stat) and reopened if
        not; else the fsync would go to the old one and the 250 rest on nothing."""
        st = os.stat(self._new)
        if self._new_fd >= 0 and (st.st_dev, st.st_ino) != self._new_id:
            self._close_new()
        if self._new_fd < 0:
            fd = os.open(self._new, _DIR_FLAGS)
            held = os.fstat(fd)
            self._new_fd, self._new_id = fd, (held.st_dev, held.st_ino)
        os.fsync(self._new_fd)

    def _close_new(self) -> None:
        fd, self._new_fd = self._new_fd, -1
        if fd >= 0:
            with suppress(OSError):
                os.close(fd)

    @property
    def commit_blocks(self) -> bool:  # type: ignore[override]
        # per_recipient: commit may make mailboxes (mkdir, and fsync when on).
        return self.fsync or self.per_recipient

    def commit_many(self, sinks: list[Sink]) -> list[str | DeliveryError]:
        """Group commit: each file is fsynced, then every new/ directory the batch
        touched is fsynced once, instead of once per message."""
        results: list[str | DeliveryError] = []
        dirs: dict[str, list[int]] = {}  # directory -> indexes of messages linked there
        for i, sink in enumerate(sinks):
            try:
                results.append(sink.commit(sync_dirs=False))  # type: ignore[call-arg]
            except DeliveryError as exc:
                results.append(exc)
                continue
            for new_dir in sink.new_dirs:  # type: ignore[attr-defined]
                dirs.setdefault(new_dir, []).append(i)
        if self.fsync:
            for new_dir, indexes in dirs.items():
                try:
                    if new_dir == self._new:
                        self._sync_new()
                    else:
                        _fsync_dir(new_dir)
                except OSError as exc:
                    error = DeliveryError(f'delivery: syncing "{new_dir}": {_why(exc)}',
                                          exc.errno)
                    for i in indexes:
                        if isinstance(results[i], str):
                            sinks[i].unpublish()  # type: ignore[attr-defined]
                            results[i] = error
        return results

    def close(self) -> None:
        self._close_new()
        self._mailboxes.clear()
