"""Started as root with server.user, the master gives the Maildir to that user and must
then never follow a symlink it plants in place of tmp/, new/ or cur/: a reload is refused
(and the server keeps serving), a start exits, the symlink's target is left alone."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import smtplib
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="server.user applies only when started as root")

def _groups_exist(*names: str) -> bool:
    try:
        for name in names:
            grp.getgrnam(name)
    except KeyError:
        return False
    return True


OLD = time.time() - 3 * 86400  # older than the 36 hours tmp/ files are kept


@pytest.fixture
def home() -> Iterator[Path]:
    """Where nobody can reach the Maildir (pytest's own folders are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="minismtp-owner-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as_nobody(action) -> None:
    """Run `action` in a child process as nobody: what a compromised worker could do."""
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _plant(mail: Path, victims: dict[str, Path]) -> None:
    def swap() -> None:
        for sub, target in victims.items():
            os.rename(mail / sub, mail / f"{sub}.away")
            os.symlink(target, mail / sub)
    _as_nobody(swap)


def _victims(home: Path) -> dict[str, Path]:
    victims = {}
    for sub in ("tmp", "new"):
        target = home / f"victim-{sub}"  # stands in for /etc, /var/log...
        target.mkdir(mode=0o755)
        (target / "important").write_text("keep me\n")
        os.utime(target / "important", (OLD, OLD))
        victims[sub] = target
    return victims


def _untouched(victims: dict[str, Path]) -> None:
    for target in victims.values():
        st = target.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o755), target
        assert os.listdir(target) == ["important"], target


def test_a_reload_and_a_start_refuse_planted_symlinks(make_server, raw_clients, home):
    mail = home / "mail"
    server = make_server({"server": {"workers": 1, "user": "nobody"},
                          "delivery": {"path": str(mail)}})
    nobody = pwd.getpwnam("nobody").pw_uid
    assert mail.stat().st_uid == (mail / "new").stat().st_uid == nobody
    victims = _victims(home)
    _plant(mail, victims)

    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(
        rf'reload refused: delivery\.path "{re.escape(str(mail))}": tmp/ is a symbolic link '
        r"\(refused: not followed\)$", since=mark)
    server.wait_for_log(r"reload refused: still running on the previous configuration$",
                        since=mark)
    _untouched(victims)
    client = raw_clients(server.port)  # still serving: the greeting and EHLO
    client.hello()
    assert server.stop() == 0

    config = str(server.config_path)
    result = subprocess.run([sys.executable, "-m", "minismtp", "serve", "--config", config],
                            cwd=home, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (f'ERROR cannot start: delivery.path "{mail}": tmp/ is a symbolic link '
            "(refused: not followed)") in result.stderr
    assert (f'ERROR cannot start: delivery.path "{mail}": new/ is a symbolic link '
            "(refused: not followed)") in result.stderr
    _untouched(victims)


# --- delivery.group in the mailboxes workers make ---------------------------------------

def _send(port: int, recipient: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("a@example.org", [recipient], b"Subject: group\r\n\r\nhello\r\n")


def _made_with(root: Path, group: str) -> list[str]:
    """The directories and files under `root` (a mailbox's domain folder) that lack
    `group`, or, for directories, its set-group-ID bit: empty when all is as wanted."""
    gid = grp.getgrnam(group).gr_gid
    wrong = []
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if st.st_gid != gid or (path.is_dir() and not st.st_mode & stat.S_ISGID):
            wrong.append(f"{path}: group {st.st_gid}, mode {stat.S_IMODE(st.st_mode):04o}")
    return wrong


def _readable_by_group(new_dir: Path, group: str) -> bool:
    """Whether a reader in `group` alone (Dovecot's mail user, say) can list `new_dir`."""
    gid = grp.getgrnam(group).gr_gid
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(9999)  # no user of the system: only the group lets it in
            os.listdir(new_dir)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(not _groups_exist("mail", "news"), reason="needs groups mail and news")
def test_mailboxes_a_worker_makes_get_delivery_group_also_after_a_reload(make_server, home):
    """Workers run as server.user, who is not in delivery.group: the mailboxes they make
    must still get the group and its set-group-ID bit (so the group's reader gets in), and
    after a reload to another group, the new workers' mailboxes get that one."""
    mail = home / "mail"
    server = make_server({"server": {"workers": 1, "user": "nobody"},
                          "delivery": {"path": str(mail), "layout": "per_recipient",
                                       "group": "mail", "file_mode": "0640",
                                       "dir_mode": "0750"}})
    _send(server.port, "b@example.org")
    assert _made_with(mail / "example.org", "mail") == []
    assert _readable_by_group(mail / "example.org" / "b" / "new", "mail")

    server.reload({"delivery": {"group": "news"}})
    _send(server.port, "c@example.net")
    assert _made_with(mail / "example.net", "news") == []
    assert _readable_by_group(mail / "example.net" / "c" / "new", "news")
    assert server.count_log(r"delivery: directory") == 0
