"""A reload changes nothing on disk before it is committed; server.user needs a restart;
a Maildir the workers' user cannot reach stops a start and refuses a reload.

The master is built for real but never forks: its reload is called directly, as the HUP
handler would, over sockets bound on 127.0.0.1.
"""

from __future__ import annotations

import logging
import grp
import os
import pwd
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from minismtp import exitcodes
from minismtp.arbiter import Arbiter
from minismtp.config import load_config
from minismtp.startup import prepare_delivery

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="server.user applies only as root")
MASTER = "minismtp.master"


def _write(path: Path, delivery: Path, user: str | None = None,
           listen: tuple[str, ...] = ("127.0.0.1:0",)) -> None:
    path.write_text(yaml.safe_dump({
        "server": {"workers": 1, "user": user, "listen": list(listen)},
        "delivery": {"path": str(delivery), "fsync": False},
    }))


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A directory every user may search (pytest's own is root's alone), so that what
    server.user can reach below it is up to each test."""
    with tempfile.TemporaryDirectory(prefix="minismtp-reload-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def _close(arbiter: Arbiter) -> None:
    """What an Arbiter opened before its first fork (its run's end closes it otherwise)."""
    arbiter.listeners.close()
    arbiter.sel.close()
    arbiter.wakeup.close()
    arbiter.board.close()
    arbiter.log_board.close()


@pytest.fixture
def master(tmp_path: Path) -> Iterator[Callable[..., Arbiter]]:
    """An Arbiter set up as `run` sets it up before its first fork."""
    made: list[Arbiter] = []

    def make(**options) -> Arbiter:
        path = tmp_path / "minismtp.yaml"
        _write(path, tmp_path / "mail", **options)
        arbiter = Arbiter(load_config(path), str(path))
        made.append(arbiter)
        arbiter.listeners.bind_missing(arbiter.config)
        prepare_delivery(arbiter.config)
        return arbiter

    yield make
    for arbiter in made:
        _close(arbiter)


@pytest.fixture
def taken() -> Iterator[str]:
    """An address another socket holds: a reload that adds it is refused after its checks."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def _owner(path: Path) -> int:
    return path.stat().st_uid


def test_a_refused_reload_makes_no_new_maildir(master, tmp_path, taken, caplog):
    arbiter = master()
    running = arbiter.config
    _write(Path(arbiter.config_path), tmp_path / "new-mail",
           listen=("127.0.0.1:0", taken))
    with caplog.at_level(logging.INFO, MASTER):
        arbiter._apply_reload()
    assert arbiter.config is running
    assert not (tmp_path / "new-mail").exists()
    assert f"reload refused: cannot listen on {taken}" in caplog.text
    assert len(arbiter.listeners.all()) == 1  # what it bound is closed again


def test_an_accepted_reload_makes_the_new_maildir(master, tmp_path):
    arbiter = master()
    _write(Path(arbiter.config_path), tmp_path / "new-mail")
    arbiter._apply_reload()
    assert arbiter.config.delivery.path == str(tmp_path / "new-mail")
    assert (tmp_path / "new-mail" / "new").is_dir()


def test_a_maildir_that_cannot_be_made_ready_refuses_the_reload_last(master, tmp_path,
                                                                      caplog, monkeypatch):
    """At the commit point, after every other check: what the reload bound is closed."""
    from minismtp import startup

    arbiter = master()
    running = arbiter.config
    (tmp_path / "a-file").write_text("not a directory\n")
    # The check before the commit says so already (test_delivery_files.py): here the file
    # took the directory's place between the checks and the commit.
    monkeypatch.setattr(startup, "delivery_problems", lambda config, serving=False: [])
    _write(Path(arbiter.config_path), tmp_path / "a-file",
           listen=("127.0.0.1:0", "127.0.0.1:0"))
    with caplog.at_level(logging.INFO, MASTER):
        arbiter._apply_reload()
    assert arbiter.config is running
    assert len(arbiter.listeners.all()) == 1
    assert "reload refused: delivery.path" in caplog.text
    assert "not a directory; still running on the previous configuration" in caplog.text


@AS_ROOT
def test_a_refused_reload_leaves_the_maildir_to_the_running_user(master, tmp_path, taken):
    arbiter = master(user="nobody")
    nobody = _owner(tmp_path / "mail")
    _write(Path(arbiter.config_path), tmp_path / "mail", user="daemon",
           listen=("127.0.0.1:0", taken))
    arbiter._apply_reload()
    assert arbiter.config.server.user == "nobody"
    assert _owner(tmp_path / "mail") == _owner(tmp_path / "mail" / "tmp") == nobody


@AS_ROOT
def test_a_reload_keeps_the_running_user_and_applies_the_rest(master, tmp_path, caplog):
    arbiter = master(user="nobody")
    nobody = _owner(tmp_path / "mail")
    _write(Path(arbiter.config_path), tmp_path / "mail", user="daemon",
           listen=("127.0.0.1:0", "127.0.0.1:0"))
    with caplog.at_level(logging.INFO, MASTER):
        arbiter._apply_reload()
    assert arbiter.config.server.user == "nobody"
    assert len(arbiter.config.server.listen) == 2  # the rest applied
    assert 'reload: server.user stays "nobody" until a restart' in caplog.text
    assert _owner(tmp_path / "mail") == nobody


@AS_ROOT
def test_a_reload_naming_no_such_user_is_refused(master, tmp_path, caplog):
    arbiter = master(user="nobody")
    running = arbiter.config
    _write(Path(arbiter.config_path), tmp_path / "mail", user="no-such-user-x")
    with caplog.at_level(logging.INFO, MASTER):
        arbiter._apply_reload()
    assert arbiter.config is running
    assert 'reload refused: server.user: no such user "no-such-user-x"' in caplog.text


def _locked(tmp_path: Path) -> Path:
    """A directory only root may search: the Maildir below it is out of nobody's reach."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    return locked / "mail"


@AS_ROOT
@pytest.mark.parametrize("running_user", ["nobody", None])
def test_a_reload_to_a_maildir_the_files_user_cannot_reach_is_refused(
        master, tmp_path, caplog, running_user):
    """Whether nobody runs now or stays out (server.user needs a restart), the file must
    be one the next start would take."""
    arbiter = master(user=running_user) if running_user else master()
    running = arbiter.config
    _write(Path(arbiter.config_path), _locked(tmp_path), user="nobody")
    with caplog.at_level(logging.INFO, MASTER):
        arbiter._apply_reload()
    assert arbiter.config is running
    assert not (tmp_path / "locked" / "mail").exists()
    assert (f'reload refused: delivery.path: server.user "nobody" cannot reach '
            f'"{tmp_path}/locked/mail": "{tmp_path}/locked" is mode 0700') in caplog.text
    assert "still running on the previous configuration" in caplog.text


@AS_ROOT
def test_a_maildir_the_user_cannot_reach_stops_the_start(tmp_path, caplog):
    path = tmp_path / "minismtp.yaml"
    _write(path, _locked(tmp_path), user="nobody")
    arbiter = Arbiter(load_config(path), str(path))
    arbiter._init_signals = lambda: pytest.fail("started: signals set up, workers next")
    try:
        with caplog.at_level(logging.INFO, MASTER):
            assert arbiter.run() == exitcodes.FAILURE
        assert not arbiter.listeners.all()
    finally:
        _close(arbiter)
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith(f'cannot start: delivery.path: server.user "nobody" cannot '
                           f'reach "{tmp_path}/locked/mail": "{tmp_path}/locked" is mode 0700')


@AS_ROOT
def test_a_reload_to_a_maildir_only_the_new_user_reaches_is_refused(master, tmp_path, caplog):
    """server.user stays nobody: the workers started now must reach the new path."""
    arbiter = master(user="nobody")
    running = arbiter.config
    daemons = tmp_path / "daemons"
    daemons.mkdir(mode=0o700)
    daemon = pwd.getpwnam("daemon")
    os.chown(daemons, daemon.pw_uid, daemon.pw_gid)  # daemon's alone
    _write(Path(arbiter.config_path), daemons / "mail", user="daemon")
    with caplog.at_level(logging.INFO, MASTER):
        arbiter._apply_reload()
    assert arbiter.config is running
    assert not (daemons / "mail").exists()
    assert (f'reload refused: delivery.path: server.user "nobody" cannot reach '
            f'"{daemons}/mail": "{daemons}" is mode 0700, owner {daemon.pw_uid}') in caplog.text


def test_a_server_not_started_as_root_asks_nothing_of_server_user(tmp_path, monkeypatch):
    """It never switches to that user, so its reach is no reason to refuse a start; the
    check-config of a file meant for a root start still asks."""
    from minismtp import startup

    path = tmp_path / "minismtp.yaml"
    _write(path, _locked(tmp_path), user="no-such-user-x")
    config = load_config(path)
    monkeypatch.setattr(startup.os, "geteuid", lambda: 4242)
    assert startup.delivery_problems(config, serving=True) == []
    assert startup.delivery_problems(config) == ['server.user: no such user "no-such-user-x"']


def _orphan(tmp_path: Path) -> Path:
    """A file in tmp/ as a worker killed mid-DATA leaves it: its pid now no process."""
    from minismtp.delivery.maildir import this_host

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    (tmp_path / "mail" / "tmp").mkdir(parents=True, exist_ok=True)
    path = tmp_path / "mail" / "tmp" / f"1765000000.M1P{pid}Q1.{this_host()}"
    path.write_bytes(b"Subject: half\r\n")
    return path


def test_a_start_removes_the_files_of_workers_no_longer_running(tmp_path):
    class Started(Exception):
        pass

    def started() -> None:
        raise Started

    path = tmp_path / "minismtp.yaml"
    _write(path, tmp_path / "mail")
    orphan = _orphan(tmp_path)
    arbiter = Arbiter(load_config(path), str(path))
    arbiter._init_signals = started  # the first step after the start's checks
    try:
        with pytest.raises(Started):
            arbiter.run()
    finally:
        _close(arbiter)
    assert not orphan.exists()


def test_a_reload_leaves_tmp_to_the_running_workers(master, tmp_path):
    arbiter = master()
    orphan = _orphan(tmp_path)
    _write(Path(arbiter.config_path), tmp_path / "mail",
           listen=("127.0.0.1:0", "127.0.0.1:0"))
    arbiter._apply_reload()
    assert len(arbiter.config.server.listen) == 2  # reloaded
    assert orphan.exists()


@AS_ROOT
def test_server_user_reaches_by_the_groups_its_workers_have(tmp_path, monkeypatch):
    """A worker runs with its user's own group and delivery.group, nothing more
    (drop_privileges): a directory open to delivery.group is reachable, one open only to
    a group /etc/group lists the user in is not."""
    from minismtp import startup

    nobody = pwd.getpwnam("nobody")
    others = [g for g in grp.getgrall() if g.gr_gid not in (0, nobody.pw_gid)]
    shared, listed = others[0], others[1]
    above = tmp_path / "above"
    above.mkdir()
    os.chown(above, 0, shared.gr_gid)
    above.chmod(0o2770)
    path = str(above / "mail")
    assert startup._unreachable(path, nobody, shared.gr_name) is None
    assert startup._unreachable(path, nobody, None) is not None
    os.chown(above, 0, listed.gr_gid)
    as_member = grp.struct_group((listed.gr_name, "x", listed.gr_gid, ["nobody"]))
    monkeypatch.setattr(grp, "getgrall", lambda: [as_member])
    assert startup._unreachable(path, nobody, None) is not None  # not a worker's group
