"""A full disk or quota (ENOSPC, EDQUOT) is answered `452 4.3.1` (RFC 5321 452
"insufficient system storage", RFC 3463 4.3.1 "mail system full"), every other storage
failure `451 4.3.0`: at DATA (the file cannot be made), while writing, and at commit."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from minismtp.delivery import DeliveryError, Peer, make_backend
from minismtp.delivery import maildir
from minismtp.delivery.maildir import MaildirBackend
from minismtp.smtp import replies
from minismtp.smtp.events import Envelope
from minismtp.worker import Worker
from support.inprocess import worker_in_process

PEER = Peer("192.0.2.7", 40123)
ENVELOPE = Envelope(helo="client.example", esmtp=True, sender="a@example.org",
                    recipients=("b@example.net",))
FULL = {"ENOSPC": errno.ENOSPC, "EDQUOT": errno.EDQUOT}


def _backend(tmp_path: Path, fsync: bool = True) -> MaildirBackend:
    b = make_backend("maildir", str(tmp_path / "mail"), fsync, "single", "mx.example.net")
    assert isinstance(b, MaildirBackend)
    b.prepare()
    return b


def _fail(code: int):
    def failing(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))
    return failing


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
@pytest.mark.parametrize("stage", ["open", "write", "fsync", "link"])
def test_the_error_carries_the_errno(tmp_path: Path, monkeypatch, stage: str,
                                     code: int) -> None:
    b = _backend(tmp_path)
    with pytest.raises(DeliveryError) as raised:
        if stage == "open":
            monkeypatch.setattr(maildir.os, "open", _fail(code))
            b.open(ENVELOPE, PEER)
        sink = b.open(ENVELOPE, PEER)
        monkeypatch.setattr(maildir.os, stage, _fail(code))
        sink.write(b"Subject: x\r\n\r\nbody\r\n")
        sink.commit()
    monkeypatch.undo()
    assert raised.value.errno == code
    assert raised.value.full is (code != errno.EIO)
    for sub in ("tmp", "new"):
        assert os.listdir(tmp_path / "mail" / sub) == []


def test_a_batch_whose_new_cannot_be_synced_for_want_of_space_is_full(
        tmp_path: Path, monkeypatch) -> None:
    b = _backend(tmp_path)
    sinks = [b.open(ENVELOPE, PEER) for _ in range(2)]
    for sink in sinks:
        sink.write(b"Subject: x\r\n\r\nbody\r\n")
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) > len(sinks):  # the files synced; new/ fails
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(maildir.os, "fsync", fsync)
    results = b.commit_many(sinks)
    assert all(isinstance(r, DeliveryError) and r.full for r in results), results


# --- the reply, through a worker ---------------------------------------------------------


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    """A worker storing into a Maildir without fsync: commits run at once, on the loop."""
    with worker_in_process(backend=_backend(tmp_path, fsync=False)) as worker:
        yield worker


def _session(worker: Worker) -> socket.socket:
    ours, theirs = socket.socketpair()
    worker._start_sessions([(ours, ("127.0.0.1", 40000), next(iter(worker.profiles)))])
    theirs.settimeout(5)
    assert theirs.recv(4096).startswith(b"220 ")
    return theirs


def _send(worker: Worker, client: socket.socket, data: bytes, replies_wanted: int) -> bytes:
    client.sendall(data)
    (session,) = worker.sessions.values()
    got = b""
    while got.count(b"\r\n") < replies_wanted:
        worker.read(session)
        got += client.recv(4096)
    return got


ENVELOPE_CMDS = b"HELO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"


def _reply_to_message(worker: Worker, monkeypatch, stage: str, code: int) -> bytes:
    """The last reply to a message whose storage fails with `code` at `stage`."""
    client = _session(worker)
    try:
        if stage == "open":
            monkeypatch.setattr(maildir.os, "open", _fail(code))
            got = _send(worker, client, ENVELOPE_CMDS + b"DATA\r\n", 4)
        else:
            _send(worker, client, ENVELOPE_CMDS + b"DATA\r\n", 4)
            monkeypatch.setattr(maildir.os, stage, _fail(code))
            got = _send(worker, client, b"Subject: x\r\n\r\nbody\r\n.\r\n", 1)
        monkeypatch.undo()
        return got.splitlines(keepends=True)[-1]
    finally:
        client.close()


@pytest.mark.parametrize("stage", ["open", "write", "link"])
@pytest.mark.parametrize("name", sorted(FULL))
def test_a_full_disk_is_answered_452(worker, monkeypatch, stage: str, name: str) -> None:
    assert _reply_to_message(worker, monkeypatch, stage, FULL[name]) == replies.STORAGE_FULL.wire
    assert replies.STORAGE_FULL.wire == (
        b"452 4.3.1 Error: insufficient system storage, try again later\r\n")
    assert worker.stats.replies[452] == 1 and worker.stats.replies[451] == 0


@pytest.mark.parametrize("stage", ["open", "write", "link"])
def test_other_storage_trouble_is_still_451(worker, monkeypatch, stage: str) -> None:
    assert _reply_to_message(worker, monkeypatch, stage, errno.EIO) == replies.LOCAL_ERROR.wire
    assert worker.stats.replies[451] == 1 and worker.stats.replies[452] == 0
