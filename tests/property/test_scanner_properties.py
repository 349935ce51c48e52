"""Hypothesis: DATA through the real core against the slow byte-at-a-time reference.

The reference (`reference_body`) splits the stream into lines on CRLF only, drops one
leading dot, and stops at the first line that is exactly ".". The core must agree with it
for any body and any chunking: same bytes, same end, and what follows is a command again.
Under bare_lf "normalize" the reference is `reference_body_normalized` (a bare LF ends a
line too, handed on as CRLF; still only CRLF "." CRLF ends the data).
"""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from minismtp.smtp import replies as R
from minismtp.smtp.events import (
    BodyChunk, ConnectionClosed, DataStarted, Hello, MailFrom, MessageEnd, MessageRejected,
    Quit, RcptTo, Reset,
)
from support.smtpdriver import (
    MODES, OPEN, Client, has_bare_lf, open_reply, queued, reference_body,
    reference_body_normalized, reply_lines, scan_body_chunks, stuff, stuff_lines,
)

from minismtp.smtp.protocol import BARE_LF_POLICIES
from minismtp.smtp.scanner import HOP_PIECE_BYTES
from minismtp.smtp.scanner import has_bare_lf as scanner_has_bare_lf

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces that make the interesting neighbourhoods likely: dots at line starts, bare CR
# and LF, and every near-miss of the terminator.
TOKENS = [b"a", b"xyz", b" ", b"\x00", b"\xff\xfe", b".", b"..", b"\r", b"\n", b"\r\n",
          b"\r\n.", b"\r\n..", b"\r\n.\r", b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"]
raw_bodies = st.one_of(
    st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join),
    st.binary(max_size=120),
)
chunk_sizes = st.lists(st.integers(min_value=1, max_value=24), min_size=1, max_size=12)
line_text = st.lists(st.sampled_from([b"a", b"..", b".", b" ", b"\r", b"\n", b"\xe9", b"\t"]),
                     max_size=8).map(b"".join)  # a CRLF inside just makes two lines
crlf_bodies = st.lists(line_text, max_size=12).map(lambda ls: b"".join(t + b"\r\n" for t in ls))
# Lines ending in CRLF or in a bare LF, as an LF-only file or a mix; no line holds an LF.
mixed_line_text = st.lists(st.sampled_from([b"a", b"..", b".", b" ", b"\r", b"\xe9", b"\t"]),
                           max_size=8).map(b"".join)
mixed_bodies = st.lists(st.tuples(mixed_line_text, st.sampled_from([b"\r\n", b"\n"])),
                        max_size=12).map(lambda ls: b"".join(t + end for t, end in ls))


def data_stream(raw: bytes) -> tuple[bytes, bytes]:
    """`raw` ended as a client would, cut after the first terminator: (stream, body)."""
    stream = raw + (b".\r\n" if raw == b"" or raw.endswith(b"\r\n") else b"\r\n.\r\n")
    found = reference_body(stream)
    assert found is not None
    body, end = found
    return stream[:end], body


def pin_edges(test):
    """@example: the terminator split at each offset, an empty body, leading dots."""
    for cut in range(1, 12):
        test = example(raw=b"hello\r\n", sizes=[cut, 64])(test)
    for raw in (b"", b".", b"..", b".lead\r\n", b"..\r\n", b"\r", b"\n", b"a\r\n.\n.\r\n"):
        test = example(raw=raw, sizes=[1])(test)
    return test


def assert_no_split_crlf(chunks: list[bytes]) -> None:
    for before, after in zip(chunks, chunks[1:]):
        assert not (before.endswith(b"\r") and after.startswith(b"\n")), (before, after)


def run_data(stream: bytes, sizes: list[int], bare_lf: str) -> Client:
    c = Client(bare_lf=bare_lf)
    assert c.send(OPEN) == open_reply()
    c.send_sized(stream + b"NOOP\r\n", sizes)
    return c


@pin_edges
@given(raw=raw_bodies, sizes=chunk_sizes)
@FAST
def test_core_body_matches_reference(raw: bytes, sizes: list[int]) -> None:
    stream, body = data_stream(raw)
    c = run_data(stream, sizes, bare_lf="accept")
    assert b"".join(c.chunks) == body
    assert c.of(MessageEnd) == [MessageEnd(len(body))]
    # The terminator was found at the same byte: what follows is one command, answered.
    assert c.replies == open_reply() + queued("Q1") + R.OK.wire
    assert_no_split_crlf(c.chunks)


def normalized_stream(raw: bytes) -> tuple[bytes, bytes]:
    """`raw` ended with CRLF "." CRLF (as curl and smtplib end an LF-only body), cut
    after the first end the normalize reference finds: (stream, body)."""
    found = reference_body_normalized(raw + b"\r\n.\r\n")
    assert found is not None
    body, end = found
    return (raw + b"\r\n.\r\n")[:end], body


@pin_edges
@given(raw=raw_bodies, sizes=chunk_sizes)
@FAST
def test_normalized_body_matches_reference(raw: bytes, sizes: list[int]) -> None:
    stream, body = normalized_stream(raw)
    c = run_data(stream, sizes, bare_lf="normalize")
    assert b"".join(c.chunks) == body and not has_bare_lf(body)
    assert c.of(MessageEnd) == [MessageEnd(len(body))]
    assert c.replies == open_reply() + queued("Q1") + R.OK.wire  # ended at the same byte
    assert_no_split_crlf(c.chunks)


@example(body=b"\n", sizes=[1])
@example(body=b".\n", sizes=[1])
@example(body=b"a\n.\n", sizes=[2, 1])
@example(body=b"a\n.\r\n", sizes=[2, 1])
@example(body=b"a\r\n.\n", sizes=[3, 1])
@example(body=b"a\n..\n", sizes=[2, 1])
@given(body=mixed_bodies, sizes=chunk_sizes)
@FAST
def test_normalized_lines_round_trip(body: bytes, sizes: list[int]) -> None:
    """Lines ending in CRLF or a bare LF, stuffed at every line start (as smtplib does)
    and ended by CRLF "." CRLF: the body comes out with CRLF only, and nothing in it
    (a "." line after a bare LF, "\n.\r\n", "\r\n.\n") ended the data early."""
    stream = stuff_lines(body) + (b".\r\n" if body[-2:] in (b"", b"\r\n") else b"\r\n.\r\n")
    expected = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not body.endswith(b"\r\n") and body:
        expected += b"\r\n"  # the CRLF before the final "." is a line of its own here
    c = run_data(stream, sizes, bare_lf="normalize")
    assert c.bodies == [expected]
    assert c.replies == open_reply() + queued("Q1") + R.OK.wire
    assert_no_split_crlf(c.chunks)


@pin_edges
@given(raw=raw_bodies, sizes=chunk_sizes)
@FAST
def test_bare_lf_policy_matches_reference(raw: bytes, sizes: list[int]) -> None:
    stream, body = data_stream(raw)
    c = run_data(stream, sizes, bare_lf="reject")
    if has_bare_lf(body):
        assert c.of(MessageRejected) == [MessageRejected(len(body), "bare LF in body")]
        assert c.replies == open_reply() + R.BARE_LF_DATA.wire + R.OK.wire
        assert not c.of(MessageEnd)
    else:
        assert c.of(MessageEnd) == [MessageEnd(len(body))] and c.bodies == [body]
        assert c.replies == open_reply() + queued("Q1") + R.OK.wire


@example(body=b"", sizes=[1])
@example(body=b".\r\n", sizes=[1])
@example(body=b".\r\n..\r\n", sizes=[2])
@example(body=b"x\r\n", sizes=[3, 1, 1, 1, 1])
@given(body=crlf_bodies, sizes=chunk_sizes)
@FAST
def test_stuffed_body_round_trips(body: bytes, sizes: list[int]) -> None:
    stream = stuff(body) + b".\r\n"
    assert reference_body(stream) == (body, len(stream))
    c = run_data(stream, sizes, bare_lf="accept")
    assert c.bodies == [body]
    assert c.replies == open_reply() + queued("Q1") + R.OK.wire
    assert_no_split_crlf(c.chunks)


@example(body=b".\r\n", sizes=[1], capacity=8)
@given(body=crlf_bodies, sizes=chunk_sizes, capacity=st.sampled_from([8, 16, 64]))
@FAST
def test_scanner_alone_round_trips_and_leaves_the_rest(body: bytes, sizes: list[int],
                                                       capacity: int) -> None:
    data = stuff(body) + b".\r\nNOOP\r\n"
    chunks, at, turn = [], 0, 0
    while at < len(data):
        chunks.append(data[at:at + sizes[turn % len(sizes)]])
        at, turn = at + sizes[turn % len(sizes)], turn + 1
    result = scan_body_chunks(chunks, capacity)
    assert result is not None
    pieces, rest = result
    assert b"".join(pieces) == body and rest == b"NOOP\r\n"
    assert_no_split_crlf(pieces)


COMMANDS = [b"EHLO c.example\r\n", b"HELO c\r\n", b"MAIL FROM:<a@b.example>\r\n",
            b"MAIL FROM:<a@b.example> SIZE=99999\r\n", b"RCPT TO:<c@d.example>\r\n",
            b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b".\r\n", b"..\r\n", b"\r\n",
            b"\n", b"\r", b"VRFY x\r\n", b"X" * 600, b"MAIL FROM:<\xff>\r\n", b"BDAT 1\r\n"]
KNOWN = (Hello, MailFrom, RcptTo, DataStarted, BodyChunk, MessageEnd, MessageRejected, Reset,
         Quit, ConnectionClosed)


@given(junk=st.lists(st.one_of(st.sampled_from(COMMANDS), st.binary(max_size=40)), max_size=30)
       .map(b"".join), mode=st.sampled_from(MODES), seed=st.integers(0, 2**16),
       bare_lf=st.sampled_from(BARE_LF_POLICIES), max_message_bytes=st.sampled_from([10, 1000]))
@FAST
def test_any_bytes_give_events_or_replies_never_exceptions(
        junk: bytes, mode: str, seed: int, bare_lf: str, max_message_bytes: int) -> None:
    c = Client(mode, seed=seed, bare_lf=bare_lf, max_errors=10,
               max_message_bytes=max_message_bytes)
    c.send(b"EHLO client.example\r\n" + junk)
    assert all(isinstance(event, KNOWN) for event in c.events)
    lines = reply_lines(c.replies)
    assert lines[:1] == [b"250-mx.test\r\n"]
    if c.conn.closed:
        assert isinstance(c.events[-1], ConnectionClosed)
        assert c.send(b"NOOP\r\n") == b""


def outcome(c: Client) -> tuple:
    """Replies, non-body events and the bodies of accepted messages. Chunks handed out
    before a body is refused may differ with the chunking; nothing else may."""
    events = [e for e in c.events if not isinstance(e, BodyChunk)]
    ends = [e for e in events if isinstance(e, (MessageEnd, MessageRejected))]
    accepted = [body for body, end in zip(c.bodies, ends) if isinstance(end, MessageEnd)]
    return c.replies, repr(events), tuple(accepted)


@example(data=b"x" * 10 + b"\n" + b"y" * 60 + b"\r\n.\r\n", seed=0, bare_lf="reject",
         limit=64)  # a bare LF before the size limit, in a body past it
@given(data=st.lists(st.one_of(st.sampled_from(COMMANDS + TOKENS), st.binary(max_size=20)),
                     max_size=30).map(b"".join), seed=st.integers(0, 2**16),
       bare_lf=st.sampled_from(BARE_LF_POLICIES), limit=st.sampled_from([64, 10**6]))
@FAST
def test_chunking_never_changes_the_outcome(data: bytes, seed: int, bare_lf: str,
                                            limit: int) -> None:
    """Whole, byte by byte, by line or at random: the same replies and decisions, with
    either limit or both (a body both too big and holding a bare LF gets one refusal)."""
    outcomes = set()
    for mode in MODES:
        c = Client(mode, seed=seed, max_errors=1000, max_message_bytes=limit,
                   bare_lf=bare_lf)
        c.send(OPEN + data)
        outcomes.add(outcome(c))
    assert len(outcomes) == 1, outcomes


long_lines = st.lists(st.tuples(st.integers(min_value=0, max_value=700),
                                st.sampled_from([b"\r\n", b"\n", b"\r", b""])),
                      max_size=12).map(lambda ls: b"".join(b"x" * n + end for n, end in ls))


@FAST
@given(st.one_of(raw_bodies, long_lines), st.integers(min_value=0, max_value=8),
       st.integers(min_value=0, max_value=8), st.sampled_from([0, 64, HOP_PIECE_BYTES]))
def test_bare_lf_search_matches_reference(body: bytes, before: int, after: int,
                                          hop_from: int) -> None:
    """Hopping from LF to LF (long lines) and sre's scan (short lines, small pieces) agree
    with the byte-at-a-time reference; bytes around the piece never count, and an LF that
    opens the piece is bare whatever precedes it."""
    data = b"\r" * before + body + b"\n" * after
    found = scanner_has_bare_lf(data, before, before + len(body), hop_from=hop_from)
    assert found == has_bare_lf(body)
