"""Replay the session corpus: NAME.in (client bytes) against NAME.out (server bytes, exact).

Each session is fed whole, byte by byte, line by line and at several random splittings,
with every decision accepted (queue ids "Q1", "Q2", ...). The .out files were written
from RFC 5321 and the reply texts, not recorded from the core.
"""

from __future__ import annotations

import pathlib

import pytest

from minismtp.smtp.events import ConnectionClosed, MailFrom, MessageEnd
from minismtp.smtp.protocol import Settings
from support.smtpdriver import MODES, Client, reply_lines

HERE = pathlib.Path(__file__).resolve().parent

SETTINGS = Settings(hostname="mx.test", max_message_bytes=2048)
SESSIONS = sorted(path.stem for path in HERE.glob("*.in"))
CHUNKINGS = [(mode, 0) for mode in MODES] + [("random", seed) for seed in (1, 2, 3, 4)]


def load(name: str) -> tuple[bytes, bytes]:
    return (HERE / f"{name}.in").read_bytes(), (HERE / f"{name}.out").read_bytes()


def replay(data: bytes, mode: str, seed: int) -> Client:
    client = Client(mode, settings=SETTINGS, seed=seed)
    client.send(data)
    return client


def test_corpus_is_complete() -> None:
    assert len(SESSIONS) >= 8
    for name in SESSIONS:
        assert (HERE / f"{name}.out").is_file(), name


@pytest.mark.parametrize("mode, seed", CHUNKINGS, ids=[f"{m}-{s}" for m, s in CHUNKINGS])
@pytest.mark.parametrize("name", SESSIONS)
def test_session(name: str, mode: str, seed: int) -> None:
    data, expected = load(name)
    client = replay(data, mode, seed)
    got = b"".join(client.batches)
    assert reply_lines(got) == reply_lines(expected)  # line by line first: a readable diff
    assert got == expected
    assert client.conn.closed and isinstance(client.events[-1], ConnectionClosed)


@pytest.mark.parametrize("name", SESSIONS)
def test_session_ignores_bytes_after_the_end(name: str) -> None:
    data, expected = load(name)
    client = replay(data + b"NOOP\r\nMAIL FROM:<late@example.org>\r\n", "whole", 0)
    assert b"".join(client.batches) == expected


@pytest.mark.parametrize("name", SESSIONS)
def test_queue_ids_follow_the_accepted_messages(name: str) -> None:
    data, expected = load(name)
    client = replay(data, "whole", 0)
    accepted = len(client.of(MessageEnd))
    for n in range(1, accepted + 1):
        assert b"250 2.0.0 Ok: queued as Q%d\r\n" % n in expected
    assert b"queued as Q%d\r\n" % (accepted + 1) not in expected


def test_smuggled_commands_stay_in_the_body() -> None:
    data, _ = load("smuggling")
    client = replay(data, "bytewise", 0)
    senders = [e.sender for e in client.of(MailFrom)]
    assert senders == ["user@example.org", "user@example.org"]
    first = client.bodies[0]
    assert b"MAIL FROM:<admin@mx.test>\r\nRCPT TO:<victim@mx.test>\r\nDATA\r\n" in first
    assert first.endswith(b"smuggled\r\n \r\nRSET\r\n")
