"""Hypothesis: `normalize_bare_lf` against the one-regex version it replaced.

The reference is one `re.sub` (`reference_normalize`): slow on dense bare LFs (a Python
match each), but plainly right. The fast version must give the same bytes for any input,
on both of its paths (sre for a few bare LFs, `replace` passes for many), and piece by
piece as the core calls it, carrying "the last piece ended in a bare LF". Past the size
limit the core only counts (`normalized_size`): the count must be the reference's length.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from minismtp.smtp.scanner import SPARSE_BYTES_PER_LF, normalize_bare_lf, normalized_size

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_BARE_LF_DOT = re.compile(rb"\n(?<!\r\n)\.?")


def reference_normalize(piece: bytes, after_bare_lf: bool) -> bytes:
    """Every LF without a CR before it -> CRLF, one "." after it dropped; after a bare LF
    in the previous piece, a leading "." too."""
    if after_bare_lf and piece[:1] == b".":
        piece = piece[1:]
    return _BARE_LF_DOT.sub(b"\r\n", piece)


# Every neighbourhood that matters: CR, LF and dot runs, CRLF before and after dots.
TOKENS = [b"a", b"xyz", b".", b"..", b"\r", b"\n", b"\r\n", b"\n.", b"\r\n.", b"\n..",
          b"\r\r\n", b"\n\n", b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\xff"]
any_bytes = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(TOKENS), max_size=80).map(b"".join),
)
# Lines with mixed endings, stuffed or not: text, then CRLF, LF or a lone CR.
line = st.tuples(st.sampled_from([b"", b".", b"..", b"..."]),
                 st.lists(st.sampled_from([b"a", b" ", b".", b"\r", b"\t"]), max_size=6),
                 st.sampled_from([b"\r\n", b"\n", b"\r"]))
mixed_lines = st.lists(line, max_size=40).map(
    lambda ls: b"".join(dots + b"".join(text) + end for dots, text, end in ls))
# Which path: sre always (a limit no piece reaches), `replace` on the first bare LF, or
# the default threshold.
thresholds = st.sampled_from([SPARSE_BYTES_PER_LF, 1 << 30, 1])


@FAST
@example(b"\n", True, 1 << 30)
@example(b".\n.", True, 1 << 30)
@example(b"\r\n.\n..\r\r\n.", False, 1 << 30)
@example(b"\n" * 200, False, SPARSE_BYTES_PER_LF)
@given(any_bytes, st.booleans(), thresholds)
def test_any_bytes_as_the_reference(data: bytes, after: bool, threshold: int) -> None:
    assert normalize_bare_lf(data, after, threshold) == reference_normalize(data, after)


@FAST
@given(mixed_lines, st.booleans(), thresholds)
def test_mixed_line_endings_as_the_reference(body: bytes, after: bool, threshold: int) -> None:
    assert normalize_bare_lf(memoryview(body), after, threshold) == \
        reference_normalize(body, after)


def cut(body: bytes, at: list[int]) -> list[bytes]:
    """`body` in pieces at the offsets `at`, moved off any CRLF (the scanner never splits
    one)."""
    bounds = sorted({min(i, len(body)) for i in at} | {0, len(body)})
    bounds = [i for i in bounds if not (0 < i < len(body) and body[i - 1:i + 1] == b"\r\n")]
    return [body[a:b] for a, b in zip(bounds, bounds[1:])]


@FAST
@example(b"a\n.b\r\n.c", [2], SPARSE_BYTES_PER_LF)
@example(b"\n\n..", [1, 2], 1 << 30)
@given(st.one_of(any_bytes, mixed_lines), st.lists(st.integers(0, 300), max_size=8),
       thresholds)
def test_piece_by_piece_as_the_whole(body: bytes, at: list[int], threshold: int) -> None:
    """As the core calls it: a piece ending in a bare LF makes the next piece's leading
    "." a stuffing dot. Pieces cut anywhere but inside a CRLF give the whole's output."""
    out, after = [], False
    for piece in cut(body, at):
        out.append(normalize_bare_lf(memoryview(piece), after, threshold))
        after = piece.endswith(b"\n") and not piece.endswith(b"\r\n")
    assert b"".join(out) == reference_normalize(body, False)


@FAST
@example(b".\n.", True, b"\r", b"")
@example(b"\n", False, b"\r", b".")
@given(st.one_of(any_bytes, mixed_lines), st.booleans(), st.sampled_from([b"", b"\r", b"\n"]),
       st.sampled_from([b"", b".", b"\n", b"\r\n."]))
def test_normalized_size_is_the_reference_length(body: bytes, after: bool, before: bytes,
                                                 beyond: bytes) -> None:
    """Counted in place, bytes around the piece never count: a CR just before it does
    not make its opening LF a CRLF."""
    data = bytearray(before + body + beyond)
    size = normalized_size(data, len(before), len(before) + len(body), after)
    assert size == len(reference_normalize(body, after))
