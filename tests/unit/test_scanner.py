"""LineScanner and BodyScanner on their own, and the ReceiveBuffer they walk."""

from __future__ import annotations

import random

import pytest
from support.smtpdriver import reference_body, scan_body_chunks

from minismtp.smtp.buffer import ReceiveBuffer
from minismtp.smtp.scanner import NEED_MORE, TOO_LONG, BodyScanner, LineScanner


def next_line(data: bytes | bytearray, start: int = 0, end: int | None = None,
              limit: int = 512, scanner: LineScanner | None = None) -> tuple[object, int]:
    """(line bytes up to its LF, offset after it), or (NEED_MORE | TOO_LONG, consumed)."""
    scanner = scanner or LineScanner(limit)
    buf = bytearray(data)
    lf, begin = scanner.next_line(buf, start, len(data) if end is None else end)
    return (bytes(buf[begin:lf]), lf + 1) if lf >= 0 else (lf, begin)


def step(data: bytes, at_line_start: bool = True) -> tuple[bytes, int, bool]:
    """One BodyScanner step over all of `data`: (body piece, resume offset, done)."""
    scanner, buf = BodyScanner(), bytearray(data)
    scanner.at_line_start = at_line_start
    resume = scanner.step(buf, 0, len(buf))
    piece = scanner.copied if scanner.copied is not None else buf[scanner.start:scanner.stop]
    return bytes(piece), resume, scanner.done


def scan(*chunks: bytes, capacity: int = 64) -> tuple[bytes, bytes]:
    """(body, bytes left after the terminator) for a body fed in these chunks."""
    result = scan_body_chunks(list(chunks), capacity)
    assert result is not None, "no terminator found"
    pieces, rest = result
    return b"".join(pieces), rest


# -- LineScanner ---------------------------------------------------------------------

@pytest.mark.parametrize("data, line, consumed", [
    (b"NOOP\r\n", b"NOOP\r", 6),  # the CR is the caller's to trim (or to miss: bare LF)
    (b"NOOP\n", b"NOOP", 5),
    (b"\r\n", b"\r", 2),
    (b"\n", b"", 1),
    (b"NOOP\r\nQUIT\r\n", b"NOOP\r", 6),
    (b"NO\rOP\r\n", b"NO\rOP\r", 7),
    (b"NOOP\r\r\n", b"NOOP\r\r", 7),
])
def test_line_endings(data: bytes, line: bytes, consumed: int) -> None:
    assert next_line(data) == (line, consumed)


@pytest.mark.parametrize("data", [b"", b"NOOP", b"NOOP\r", b"\r"])
def test_partial_line_needs_more_and_consumes_nothing(data: bytes) -> None:
    assert next_line(data) == (NEED_MORE, 0)


def test_line_within_start_and_end_only() -> None:
    data = b"xxNOOP\r\nQUIT\r\n"
    assert next_line(data, 2) == (b"NOOP\r", 8)
    assert next_line(data, 8, 12) == (NEED_MORE, 8)  # "QUIT" without its CRLF yet


def test_partial_line_completed_by_a_later_read() -> None:
    scanner, data = LineScanner(512), b"MAIL FROM:<a@b>\r\n"
    assert next_line(data, 0, 9, scanner=scanner) == (NEED_MORE, 0)
    assert next_line(data, 0, 16, scanner=scanner) == (NEED_MORE, 0)
    assert next_line(data, 0, 17, scanner=scanner) == (b"MAIL FROM:<a@b>\r", 17)


@pytest.mark.parametrize("limit", [8, 512])
def test_line_limit_counts_the_crlf(limit: int) -> None:
    fits = b"A" * (limit - 2) + b"\r\n"
    assert next_line(fits, limit=limit) == (fits[:-1], limit)
    assert next_line(b"A" + fits, limit=limit) == (TOO_LONG, limit + 1)
    assert next_line(b"A" * (limit - 1), limit=limit) == (NEED_MORE, 0)
    assert next_line(b"A" * (limit - 2) + b"\r", limit=limit) == (NEED_MORE, 0)
    assert next_line(b"A" * limit, limit=limit) == (TOO_LONG, limit)  # can no longer fit


def test_long_line_is_reported_once_and_skipped_to_its_lf() -> None:
    scanner = LineScanner(8)
    assert next_line(b"ABCDEFGHIJ", scanner=scanner) == (TOO_LONG, 10)
    assert scanner.discarding
    assert next_line(b"KLMNOP", scanner=scanner) == (NEED_MORE, 6)  # dropped, not kept
    assert next_line(b"QR\nNOOP\r\n", scanner=scanner) == (b"NOOP\r", 9)
    assert not scanner.discarding


def test_long_line_ending_in_the_same_read() -> None:
    scanner = LineScanner(8)
    assert next_line(b"ABCDEFGHIJ", scanner=scanner) == (TOO_LONG, 10)
    assert next_line(b"Z\nNOOP", scanner=scanner) == (NEED_MORE, 2)


def test_reset_forgets_a_long_line() -> None:
    scanner = LineScanner(8)
    next_line(b"ABCDEFGHIJ", scanner=scanner)
    scanner.reset()
    assert next_line(b"NOOP\r\n", scanner=scanner) == (b"NOOP\r", 6)


def test_line_search_survives_buffer_compaction() -> None:
    buf, scanner = ReceiveBuffer(12), LineScanner(512)
    assert buf.feed(b"NOOP\r\nVRFY abc\r\n") == 12
    assert scanner.next_line(buf.data, buf.start, buf.end) == (5, 0)
    buf.start = 6
    assert scanner.next_line(buf.data, buf.start, buf.end) == (NEED_MORE, 6)
    assert buf.feed(b"bc\r\n") == 4  # the buffer was full: "VRFY a" moved to the front
    assert (buf.start, buf.capacity) == (0, 12)
    assert scanner.next_line(buf.data, buf.start, buf.end) == (9, 0)
    assert bytes(buf.data[0:9]) == b"VRFY abc\r"


# -- BodyScanner, one step -----------------------------------------------------------

@pytest.mark.parametrize("data, at_line_start", [
    (b"", True), (b".", True), (b".\r", True), (b"\r", True), (b"\r", False),
])
def test_step_needs_more(data: bytes, at_line_start: bool) -> None:
    assert step(data, at_line_start) == (b"", 0, False)


@pytest.mark.parametrize("data, resume", [
    (b".\r\n", 3), (b".\r\nNOOP\r\n", 3), (b".\r\n.\r\n", 3),
])
def test_terminator_at_the_start(data: bytes, resume: int) -> None:
    assert step(data) == (b"", resume, True)


def test_dot_crlf_is_no_terminator_in_mid_line() -> None:
    assert step(b".\r\n", at_line_start=False) == (b".\r\n", 3, False)
    assert step(b"x.\r\n") == (b"x.\r\n", 4, False)


def test_plain_text_is_taken_whole() -> None:
    assert step(b"hello world") == (b"hello world", 11, False)


def test_body_and_a_whole_terminator_are_one_step() -> None:
    """A short message's body goes on in one piece, its last CRLF included."""
    assert step(b"hello\r\n.\r\nNOOP") == (b"hello\r\n", 10, True)


def test_a_terminator_past_the_read_is_not_seen() -> None:
    """Bytes beyond `end` (an older read's, left in the buffer) never end the body."""
    scanner = BodyScanner()
    assert scanner.step(bytearray(b"ab\r\n.\r\nX"), 0, 6) == 2
    assert (scanner.start, scanner.stop, scanner.done) == (0, 2, False)


def test_trailing_cr_is_held_back() -> None:
    assert step(b"hello\r") == (b"hello", 5, False)
    assert step(b"hello\r\r") == (b"hello\r", 6, False)


def test_stuffed_dot_at_the_start_is_dropped() -> None:
    assert step(b"..x") == (b".x", 3, False)
    assert step(b".x") == (b"x", 2, False)
    assert step(b".\rx") == (b"\rx", 3, False)


# -- BodyScanner over whole bodies ---------------------------------------------------

@pytest.mark.parametrize("data, body, rest", [
    (b".\r\n", b"", b""),
    (b".\r\nNOOP\r\n", b"", b"NOOP\r\n"),
    (b"..\r\n.\r\n", b".\r\n", b""),
    (b"..\r\n..\r\n.\r\nQUIT", b".\r\n.\r\n", b"QUIT"),
    (b"a\r\n.b\r\n..c\r\n.\r\nX", b"a\r\nb\r\n.c\r\n", b"X"),
    (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n", b""),
    (b"a\r\n.\nb\r\n.\r\n", b"a\r\n\nb\r\n", b""),
    (b"a\n.\r\nb\r\n.\r\n", b"a\n.\r\nb\r\n", b""),
    (b"a\r.\r\nb\r\n.\r\n", b"a\r.\r\nb\r\n", b""),
    (b"\r\n\r\n.\r\n", b"\r\n\r\n", b""),
    (b"x\r\n.\r\n.\r\n", b"x\r\n", b".\r\n"),
])
def test_whole_bodies(data: bytes, body: bytes, rest: bytes) -> None:
    assert reference_body(data) == (body, len(data) - len(rest))
    assert scan(data) == (body, rest)


@pytest.mark.parametrize("data", [b"hello\r\n.\r\nNOOP", b"..\r\n.\r\nNOOP", b".\r\nNOOP",
                                  b"a\r\n.\r\r\n.\r\nNOOP"])
def test_any_split_into_two_reads(data: bytes) -> None:
    body, end = reference_body(data)
    for cut in range(len(data) + 1):
        assert scan(data[:cut], data[cut:]) == (body, data[end:]), cut
    assert scan(*[data[i:i + 1] for i in range(len(data))]) == (body, data[end:])


def test_pieces_never_split_a_crlf() -> None:
    data = b"ab\r\ncd\r\n..e\r\r\n\r\n.\r\n"
    for cut in range(1, len(data)):
        pieces, _ = scan_body_chunks([data[:cut], data[cut:]], 64)
        for before, after in zip(pieces, pieces[1:]):
            assert not (before.endswith(b"\r") and after.startswith(b"\n")), (cut, pieces)


def test_no_terminator_means_no_end() -> None:
    for data in (b"a\n.\n", b"a\r\n.\n", b"a\n.\r\n", b"a\r.\r\n", b"a\r\n. \r\n", b"a\r\n.."):
        assert scan_body_chunks([data], 64) is None


def test_body_larger_than_the_buffer() -> None:
    data = b"".join(b"%05d .line\r\n..dot\r\n" % i for i in range(300)) + b".\r\nNOOP"
    body, end = reference_body(data)
    rng = random.Random(4)
    chunks, at = [], 0
    while at < len(data):
        size = rng.randint(1, 40)
        chunks.append(data[at:at + size])
        at += size
    assert scan(*chunks, capacity=32) == (body, b"NOOP")


# -- ReceiveBuffer -------------------------------------------------------------------

def test_free_view_and_commit() -> None:
    buf = ReceiveBuffer(16)
    view = buf.free_view()
    assert len(view) == 16 and len(buf) == 0
    view[:5] = b"hello"
    buf.commit(5)
    assert (buf.start, buf.end, len(buf)) == (0, 5, 5)
    assert bytes(buf.data[buf.start:buf.end]) == b"hello"
    assert len(buf.free_view()) == 11
    with pytest.raises(ValueError):
        buf.commit(12)
    with pytest.raises(ValueError):
        buf.commit(-1)
    assert (buf.start, buf.end) == (0, 5)


def test_feed_takes_only_what_fits() -> None:
    buf = ReceiveBuffer(8)
    assert buf.feed(b"0123456789") == 8
    assert buf.feed(b"x") == 0  # full and nothing consumed: no room to make
    buf.start = 3  # three bytes consumed
    assert buf.feed(b"89x") == 3
    assert bytes(buf.data) == b"3456789x" and (buf.start, buf.end) == (0, 8)


def test_empty_buffer_rewinds_and_a_low_one_compacts() -> None:
    buf = ReceiveBuffer(16)
    buf.feed(b"0123456789")
    buf.start = 10
    buf.free_view()
    assert (buf.start, buf.end) == (0, 0)
    buf.feed(b"0123456789")
    buf.start = 9  # more than half consumed, one byte left
    assert len(buf.free_view()) == 15
    assert (buf.start, buf.end, bytes(buf.data[:1])) == (0, 1, b"9")


def test_view_borrows_without_copying() -> None:
    buf = ReceiveBuffer(8)
    buf.feed(b"abcdef")
    view = buf.view(1, 4)
    assert bytes(view) == b"bcd"
    buf.data[2] = ord("X")
    assert bytes(view) == b"bXd"


def test_capacity_changes_only_by_resize() -> None:
    rng, buf = random.Random(1), ReceiveBuffer(32)
    data = bytearray()
    for _ in range(2000):
        if rng.random() < 0.5:
            chunk = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
            data += chunk[:buf.feed(chunk)]
        else:
            n = rng.randint(0, len(buf))
            buf.start += n
            del data[:n]
        assert buf.capacity == 32 and len(buf) <= 32
        assert bytes(buf.data[buf.start:buf.end]) == bytes(data)


def test_resize_keeps_the_unconsumed_bytes() -> None:
    buf = ReceiveBuffer(16)
    buf.feed(b"0123456789")
    buf.start = 4
    borrowed = buf.view(4, 10)
    buf.resize(64)  # a live view of the old storage must not get in the way
    assert (buf.capacity, buf.start, buf.end) == (64, 0, 6)
    assert bytes(buf.data[:6]) == b"456789" and bytes(borrowed) == b"456789"
    buf.resize(6)
    assert (buf.capacity, bytes(buf.data[buf.start:buf.end])) == (6, b"456789")


def test_resize_refuses_to_drop_bytes() -> None:
    buf = ReceiveBuffer(16)
    buf.feed(b"0123456789")
    with pytest.raises(ValueError):
        buf.resize(9)
    assert buf.capacity == 16 and bytes(buf.data[buf.start:buf.end]) == b"0123456789"
