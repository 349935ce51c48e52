"""The master never follows a symlink in place of a Maildir's tmp/, new/ or cur/: with
server.user the workers' user owns the root and may plant one, for the master (root) to
chown, clean or write in its target. The root itself may be a symlink (the operator's).
"""

from __future__ import annotations

import logging
import os
import pwd
import time
from pathlib import Path

import pytest
import yaml

from minismtp.config import load_config
from minismtp.debris import Sweeper
from minismtp.delivery import DeliveryError, make_backend
from minismtp.delivery.maildir import MaildirBackend, clean_tmp
from minismtp.startup import delivery_problems, prepare_delivery

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="server.user applies only as root")
HOST = "mx.example.net"
OLD = time.time() - 3 * 86400  # older than the 36 hours clean_tmp goes by


def _target(tmp_path: Path) -> Path:
    """A directory standing in for /etc: a file in it old enough for clean_tmp."""
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    (target / "important").write_text("keep me\n")
    os.utime(target / "important", (OLD, OLD))
    return target


def _plant(root: Path, sub: str, target: Path) -> None:
    if (root / sub).exists():
        (root / sub).rmdir()
    (root / sub).symlink_to(target)


def _backend(path: Path, layout: str = "single") -> MaildirBackend:
    b = make_backend("maildir", str(path), True, layout, HOST)
    assert isinstance(b, MaildirBackend)
    return b


@pytest.mark.parametrize("layout, sub", [("single", "tmp"), ("single", "new"),
                                         ("single", "cur"), ("per_recipient", "tmp")])
def test_prepare_refuses_a_symlinked_subdirectory(tmp_path: Path, layout: str,
                                                  sub: str) -> None:
    root, target = tmp_path / "mail", _target(tmp_path)
    _backend(root, layout).prepare()
    _plant(root, sub, target)
    with pytest.raises(DeliveryError) as raised:
        _backend(root, layout).prepare()
    assert str(raised.value) == (
        f'delivery.path "{root}": {sub}/ is a symbolic link (refused: not followed)')
    assert os.listdir(target) == ["important"]  # not cleaned, no probe written there


def test_prepare_refuses_a_subdirectory_that_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    (root / "new").write_text("")
    with pytest.raises(DeliveryError, match=f'^delivery.path "{root}": new/ is not a directory$'):
        _backend(root).prepare()


def test_the_root_itself_may_be_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (tmp_path / "mail").symlink_to(real)
    real.mkdir()
    _backend(tmp_path / "mail").prepare()
    assert sorted(os.listdir(real)) == ["cur", "new", "tmp"]


def test_clean_tmp_does_not_follow_a_symlinked_tmp(tmp_path: Path) -> None:
    root, target = tmp_path / "mail", _target(tmp_path)
    _backend(root).prepare()
    _plant(root, "tmp", target)
    with pytest.raises(NotADirectoryError):
        clean_tmp(str(root))
    assert os.listdir(target) == ["important"]


def test_check_config_names_a_symlinked_subdirectory(tmp_path: Path) -> None:
    root, target = tmp_path / "mail", _target(tmp_path)
    _backend(root).prepare()
    _plant(root, "cur", target)
    config_path = tmp_path / "minismtp.yaml"
    config_path.write_text(yaml.safe_dump({"delivery": {"path": str(root)}}))
    assert delivery_problems(load_config(config_path)) == [
        f'delivery.path "{root}": cur/ is a symbolic link (refused: not followed)']


def test_the_sweeper_skips_a_symlinked_tmp(tmp_path: Path, caplog) -> None:
    root, target = tmp_path / "mail", _target(tmp_path)
    _backend(root).prepare()
    _plant(root, "tmp", target)
    (target / "1765000000.M1P100Q1.host").write_text("not a worker's\n")
    sweeper = Sweeper()
    sweeper.add(str(root / "tmp"), 100, "host")
    with caplog.at_level(logging.WARNING, "minismtp.master"):
        sweeper.sweep(1000, live_pids=())
    assert not sweeper.busy
    assert sorted(os.listdir(target)) == ["1765000000.M1P100Q1.host", "important"]
    assert (f"cannot clean {root / 'tmp'} after worker 100: is a symbolic link "
            "(refused: not followed)") in caplog.text


def _config(tmp_path: Path, root: Path, layout: str = "single") -> Path:
    path = tmp_path / "minismtp.yaml"
    path.write_text(yaml.safe_dump({
        "server": {"user": "nobody", "listen": ["127.0.0.1:0"]},
        "delivery": {"path": str(root), "layout": layout, "fsync": False},
    }))
    return path


@AS_ROOT
@pytest.mark.parametrize("layout, sub", [("single", "new"), ("per_recipient", "tmp")])
def test_root_gives_away_no_symlinks_target(tmp_path: Path, layout: str, sub: str) -> None:
    """Planted after the check (a race with a reload): prepare_delivery, as root, still
    gives nothing but the Maildir's own directories to server.user."""
    root, target = tmp_path / "mail", _target(tmp_path)
    config = load_config(_config(tmp_path, root, layout))
    prepare_delivery(config)
    nobody = pwd.getpwnam("nobody").pw_uid
    assert root.stat().st_uid == (root / "tmp").stat().st_uid == nobody
    _plant(root, sub, target)
    with pytest.raises(DeliveryError, match=f"{sub}/ is a symbolic link"):
        prepare_delivery(config)
    assert target.stat().st_uid == 0 and target.stat().st_mode & 0o7777 == 0o755
    with pytest.raises(DeliveryError, match=f"{sub}/ is a symbolic link"):
        _backend(root, layout).give_to(nobody, nobody)
    assert target.stat().st_uid == 0


@AS_ROOT
def test_a_per_recipient_domain_named_new_is_not_given_away(tmp_path: Path) -> None:
    """per_recipient: the root holds tmp/ and the workers' mailboxes, made as server.user
    already; root gives the root and tmp/ only."""
    root = tmp_path / "mail"
    config = load_config(_config(tmp_path, root, "per_recipient"))
    prepare_delivery(config)
    (root / "new").mkdir()  # the domain "new", made here as root for the test
    prepare_delivery(config)
    assert (root / "new").stat().st_uid == 0


def test_a_subdirectory_made_but_not_finished_is_closed(tmp_path: Path, monkeypatch) -> None:
    """A directory fsync the file system refuses (EINVAL on some network ones): prepare()
    fails naming it, and leaves no descriptor open behind it, start or reload alike."""
    import errno
    import stat

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    before = len(os.listdir("/proc/self/fd"))
    for attempt in range(3):
        with pytest.raises(DeliveryError, match="cannot create tmp/: Invalid argument"):
            MaildirBackend(str(tmp_path / f"m{attempt}"), fsync=True).prepare()
    assert len(os.listdir("/proc/self/fd")) == before
