"""Replay the session corpus: NAME.in (client bytes) against NAME.out (server bytes, exact).

Each session is fed whole, byte by byte, line by line and at several random splittings,
with every decision accepted (queue ids "Q1", "Q2", ...), under each bare-LF policy:
NAME.out holds the replies under "reject", NAME.POLICY.out those under another policy
where they differ. The .out files were written from RFC 5321 and the reply texts (the
.normalize and .accept ones checked by hand against the rules in scanner.py).
"""

from __future__ import annotations

import pathlib
from dataclasses import replace

import pytest

from minismtp.smtp.events import ConnectionClosed, MailFrom, MessageEnd
from minismtp.smtp.protocol import BARE_LF_POLICIES, Settings
from support.smtpdriver import MODES, Client, reply_lines

HERE = pathlib.Path(__file__).resolve().parent

SETTINGS = Settings(hostname="mx.test", max_message_bytes=2048, bare_lf="reject")
SESSIONS = sorted(path.stem for path in HERE.glob("*.in"))
CHUNKINGS = [(mode, 0) for mode in MODES] + [("random", seed) for seed in (1, 2, 3, 4)]


def load(name: str, bare_lf: str = "reject") -> tuple[bytes, bytes]:
    expected = HERE / f"{name}.{bare_lf}.out"
    if not expected.is_file():
        expected = HERE / f"{name}.out"
    return (HERE / f"{name}.in").read_bytes(), expected.read_bytes()


def replay(data: bytes, mode: str, seed: int, bare_lf: str = "reject") -> Client:
    settings = SETTINGS if bare_lf == "reject" else replace(SETTINGS, bare_lf=bare_lf)
    client = Client(mode, settings=settings, seed=seed)
    client.send(data)
    return client


def test_corpus_is_complete() -> None:
    assert len(SESSIONS) >= 8
    for name in SESSIONS:
        assert (HERE / f"{name}.out").is_file(), name


@pytest.mark.parametrize("mode, seed", CHUNKINGS, ids=[f"{m}-{s}" for m, s in CHUNKINGS])
@pytest.mark.parametrize("bare_lf", BARE_LF_POLICIES)
@pytest.mark.parametrize("name", SESSIONS)
def test_session(name: str, bare_lf: str, mode: str, seed: int) -> None:
    data, expected = load(name, bare_lf)
    client = replay(data, mode, seed, bare_lf)
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


@pytest.mark.parametrize("bare_lf", BARE_LF_POLICIES)
def test_smuggled_commands_stay_in_the_body(bare_lf: str) -> None:
    data, _ = load("smuggling")
    client = replay(data, "bytewise", 0, bare_lf)
    senders = [e.sender for e in client.of(MailFrom)]
    assert senders == ["user@example.org", "user@example.org"]
    first = client.bodies[0]
    assert b"MAIL FROM:<admin@mx.test>\r\nRCPT TO:<victim@mx.test>\r\nDATA\r\n" in first
    assert first.endswith(b"smuggled\r\n \r\nRSET\r\n")
