"""Sweeping a dead worker's unfinished files out of tmp/: only its own, a bounded amount
per call."""

from __future__ import annotations

import os

from minismtp.debris import Sweeper, owner
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
