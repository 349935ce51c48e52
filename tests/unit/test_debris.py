"""Sweeping a dead worker's unfinished files out of tmp/: only its own, a bounded amount
per call; at start, those of every pid of this host no longer running."""

from __future__ import annotations

import os

import pytest

from minismtp.debris import Sweeper, owner, remove_orphans
from minismtp.delivery.maildir import this_host


def test_owner_reads_only_the_maildir_sink_names():
    assert owner("1765000000.M123456P4242Q7.mx.example") == (4242, "mx.example")
    assert owner("1765000000.M123456P4242Q7.mx\\057x") == (4242, "mx\\057x")  # encoded
    for name in ("notes.txt", ".probe.4242", "1765000000.M1P4242.host",
                 "x1765000000.M1P4242Q1.host", "1765000000.M1P4242Q1",
                 "1765000000.M1P4242Q1."):
        assert owner(name) is None, name


def _tmp(tmp_path, names: list[str]) -> str:
    directory = tmp_path / "tmp"
    directory.mkdir()
    for name in names:
        (directory / name).write_bytes(b"partial")
    return str(directory)


def test_only_the_dead_workers_regular_files_go(tmp_path):
    mine = [f"17650000{n:02}.M1P100Q{n}.host" for n in range(3)]
    others = ["1765000000.M1P1000Q1.host", "1765000000.M1P10Q1.host", "readme"]
    directory = _tmp(tmp_path, mine + others)
    os.mkdir(os.path.join(directory, "1765000000.M1P100Q9.host"))
    os.symlink("/etc/passwd", os.path.join(directory, "1765000000.M1P100Q8.host"))
    sweeper = Sweeper()
    sweeper.add(directory, 100, "host")
    sweeper.sweep(1000, live_pids=())
    assert not sweeper.busy
    assert sorted(os.listdir(directory)) == sorted(
        others + ["1765000000.M1P100Q9.host", "1765000000.M1P100Q8.host"])


def test_each_call_looks_at_no_more_than_its_budget(tmp_path):
    names = [f"1765000000.M{n}P100Q{n}.host" for n in range(10)]
    directory = _tmp(tmp_path, names)
    sweeper = Sweeper()
    sweeper.add(directory, 100, "host")
    sweeper.sweep(4, live_pids=())
    assert len(os.listdir(directory)) == 6 and sweeper.busy
    sweeper.sweep(4, live_pids=())
    assert len(os.listdir(directory)) == 2 and sweeper.busy
    sweeper.sweep(4, live_pids=())
    assert os.listdir(directory) == [] and not sweeper.busy


def test_another_hosts_files_with_the_same_pid_stay(tmp_path):
    """Two instances share the Maildir (NFS, containers): a pid of theirs is not ours."""
    directory = _tmp(tmp_path, ["1765000000.M1P100Q1.host", "1765000000.M2P100Q1.other"])
    sweeper = Sweeper()
    sweeper.add(directory, 100, "host")
    sweeper.sweep(1000, live_pids=())
    assert os.listdir(directory) == ["1765000000.M2P100Q1.other"]


def test_the_name_a_worker_was_started_with_is_the_one_swept(tmp_path):
    """The host may be renamed while the master runs (hostnamectl, cloud-init): a
    worker's files carry the name it was started with, which its record keeps."""
    names = ["1765000000.M1P100Q1.then", "1765000000.M2P100Q1.other"]
    directory = _tmp(tmp_path, names)
    sweeper = Sweeper()
    sweeper.add(directory, 100, "then")
    sweeper.sweep(1000, live_pids=())
    assert os.listdir(directory) == ["1765000000.M2P100Q1.other"]


def test_this_host_is_the_one_the_maildir_sink_writes(tmp_path):
    from minismtp.delivery.maildir import MaildirBackend

    backend = MaildirBackend(str(tmp_path / "mail"))
    assert this_host() == backend._host


def test_a_pid_given_to_a_live_worker_again_is_not_swept(tmp_path):
    directory = _tmp(tmp_path, ["1765000000.M1P100Q1.host"])
    sweeper = Sweeper()
    sweeper.add(directory, 100, "host")
    sweeper.sweep(1000, live_pids={100})
    assert os.listdir(directory) == ["1765000000.M1P100Q1.host"] and not sweeper.busy


def test_a_missing_directory_is_logged_and_dropped(tmp_path, caplog):
    sweeper = Sweeper()
    sweeper.add(str(tmp_path / "gone"), 100, "host")
    sweeper.sweep(1000, live_pids=())
    assert not sweeper.busy
    assert "cannot clean" in caplog.text


# --- at start: the files of workers no longer running ------------------------------------


def _dead_pid() -> int:
    """The pid of a child that has exited and been reaped (free until reused)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_at_start_the_files_of_dead_pids_of_this_host_go(tmp_path):
    dead, alive, host = _dead_pid(), os.getpid(), this_host()
    gone = [f"1765000000.M1P{dead}Q1.{host}", f"1765000000.M2P{dead}Q2.{host}"]
    kept = [f"1765000000.M1P{alive}Q1.{host}",  # a live process's: in use
            f"1765000000.M1P{dead}Q1.other.example",  # another host's
            f"1765000000.M1P{dead}.{host}", "readme", f".probe.{dead}"]
    directory = _tmp(tmp_path, gone + kept)
    os.mkdir(os.path.join(directory, f"1765000000.M3P{dead}Q3.{host}"))
    os.symlink("/etc/passwd", os.path.join(directory, f"1765000000.M4P{dead}Q4.{host}"))
    assert remove_orphans(directory) == 2
    assert sorted(os.listdir(directory)) == sorted(
        kept + [f"1765000000.M3P{dead}Q3.{host}", f"1765000000.M4P{dead}Q4.{host}"])


def test_at_start_a_symlinked_tmp_is_not_followed(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    name = f"1765000000.M1P{_dead_pid()}Q1.{this_host()}"
    (target / name).write_bytes(b"not in the Maildir")
    (tmp_path / "tmp").symlink_to(target)
    with pytest.raises(NotADirectoryError):
        remove_orphans(str(tmp_path / "tmp"))
    assert os.listdir(target) == [name]
