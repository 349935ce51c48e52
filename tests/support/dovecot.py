"""A throwaway Dovecot IMAP server over minismtp's Maildir: the `dovecot` fixture.

Each instance has its own configuration file, `base_dir`, `state_dir` and log in a
temporary directory (`dovecot -F -c FILE`, in the foreground, so the fixture holds its
master process), IMAP on a free 127.0.0.1 port, no TLS (`ssl = no`, plaintext logins
allowed), and one user in a passwd-file (passdb and userdb) whose mail is a Maildir the
test names. Dovecot refuses to open mail as root, so the user's uid and gid are those of
an unprivileged system user (`nobody` by default); minismtp's workers run as the same
user (`server.user`), so the Maildir and its files belong to it.

The fixture stops the master with SIGTERM (it stops its children) and makes sure none of
its processes is left (killing any that are), also when the test fails.
"""

from __future__ import annotations

import imaplib
import pwd
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.neighbours import (end_processes, free_port, process_tree, program,
                                require_root, wait_for_port)

START_ATTEMPTS = 3
MAIL_USER = "nobody"
IMAP_USER = "tester"
IMAP_PASSWORD = "not-a-secret"

CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
instance_name = minismtp-test-{port}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
log_path = {root}/dovecot.log
default_login_user = dovenull
default_internal_user = dovecot
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/passwd
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


class Dovecot:
    def __init__(self, root: Path, maildir: Path, mail_user: str = MAIL_USER,
                 ids: tuple[int, int] | None = None) -> None:
        self.root = root
        self.maildir = maildir
        user = pwd.getpwnam(mail_user)
        # (uid, gid) Dovecot reads the mail as: the mail user's own, or others given
        self.ids = ids or (user.pw_uid, user.pw_gid)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.tree: dict[int, int] = {}

    @property
    def config_path(self) -> Path:
        return self.root / "dovecot.conf"

    def start(self) -> Dovecot:
        uid, gid = self.ids
        (self.root / "passwd").write_text(
            f"{IMAP_USER}:{{PLAIN}}{IMAP_PASSWORD}:{uid}:{gid}::"
            f"{self.maildir}::userdb_mail=maildir:{self.maildir}\n")
        failures = []
        for _ in range(START_ATTEMPTS):
            self.port = free_port()
            self.config_path.write_text(CONFIG.format(root=self.root, port=self.port))
            self.proc = subprocess.Popen(
                [program("dovecot"), "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)
            if wait_for_port(self.port, 15) and self.proc.poll() is None:
                self.tree.update(process_tree(self.proc.pid))
                return self
            failures.append(f"exit {self.proc.poll()}")
            self.stop()
        raise AssertionError(f"Dovecot did not start: {failures}\n{self.log()[-3000:]}")

    def log(self) -> str:
        try:
            return (self.root / "dovecot.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def login(self) -> imaplib.IMAP4:
        imap = imaplib.IMAP4("127.0.0.1", self.port, timeout=30)
        imap.login(IMAP_USER, IMAP_PASSWORD)
        return imap

    def stop(self) -> list[int]:
        """Stop the instance; returns the pids that had to be killed (none, normally)."""
        if self.proc is None:
            return []
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            self.tree.update(process_tree(proc.pid))
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()
        return end_processes(self.tree, timeout=10)


@pytest.fixture
def dovecot(shared_tmp: Path) -> Iterator[Callable[[Path], Dovecot]]:
    """`dovecot(maildir)` starts an IMAP server whose one user's INBOX is `maildir`;
    `dovecot(maildir, ids=(uid, gid))` reads it as that uid and gid, not MAIL_USER's."""
    require_root("Dovecot")
    program("dovecot")
    instances: list[Dovecot] = []

    def start(maildir: Path, ids: tuple[int, int] | None = None) -> Dovecot:
        root = shared_tmp / f"dovecot{len(instances)}"
        root.mkdir()
        instance = Dovecot(root, maildir, ids=ids)
        instances.append(instance)
        return instance.start()

    yield start
    for instance in instances:
        killed = instance.stop()
        assert not killed, f"Dovecot processes still running after stop: {killed}"
