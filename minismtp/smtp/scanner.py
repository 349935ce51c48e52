"""Scanners that walk the receive buffer with `find`, never line by line in Python.

Untrusted input: client bytes of any length and content. Both scanners work on
`buf[start:end]` in place and report offsets; neither keeps bytes between calls, and
only runs of dot-stuffed body lines are ever copied (see below).

Theory of operation
-------------------
Commands (`LineScanner`): a command ends at LF. A line longer than the limit is reported
once as TOO_LONG and then skipped up to its LF without being kept, so a megabyte "line"
costs no memory. Whether the LF had its CR before it is reported, and the protocol core
applies the bare-LF policy.

Body (`BodyScanner`): only CRLF "." CRLF ends DATA (RFC 5321 section 4.1.1.4); "\\n.\\n",
"\\r\\n.\\n", "\\n.\\r\\n" and "\\r.\\r\\n" are body bytes (the SMTP smuggling defence).
Per read, a one-byte find for "." (memchr) settles a run with no dot at all (base64);
otherwise one search for b"\\r\\n." finds the terminator or the first stuffed dot. Body
before it is handed out as a slice of the buffer, never copied. From a stuffed dot on, the
rest of the read is unstuffed in bulk (one `replace`, up to the terminator), holding back
the last few bytes that could begin a terminator. The one bit carried between reads is
"at line start" (true when DATA begins, or when a read ended in CRLF): there a dot before
CRLF is the end and any other dot is a stuffing dot (section 4.5.2). A lone trailing CR is
never handed out, since it may start the next CRLF, so every CRLF lies inside one piece
(sinks rely on this to change line endings piece by piece).

Bare LF under `limits.bare_lf: normalize` (Postfix 3.9's default): the body scanner runs
as above, CRLF-only, so the terminator is still CRLF "." CRLF and nothing else. Its pieces
go through `normalize_bare_lf` only when they hold a bare LF (`has_bare_lf`, which the
reject policy pays too: one sre scan, or memchr hops over long lines) or follow one: each
bare LF becomes CRLF and one "." right after it is dropped, as after a CRLF (by sre
for a few, by whole-piece `replace` passes for many: no Python step per line). A line
ending in a bare LF is a line, so a client that stuffs it (smtplib does, after every LF;
Postfix unstuffs it) gets its text back, and a "." there is never a terminator. Piece by
piece is exact because the scanner's output differs from its input only by dots dropped
right after a CRLF: an LF is bare in the output iff it was in the input, and as no CRLF
is split between pieces, an LF that opens a piece is bare. The bit carried between
pieces, "the last piece ended in a bare LF", is the core's.
"""

from __future__ import annotations

import re

CR, LF, DOT = 0x0D, 0x0A, 0x2E

# What `LineScanner.next_line` reports instead of a line's LF offset (never >= 0).
NEED_MORE = -1  # no whole line yet
TOO_LONG = -2  # a line over the limit; it is dropped up to its LF


class LineScanner:
    """Finds command lines of at most `max_line_bytes` octets, line ending included, or
    `extra_bytes` more for a line that begins with `extended` (ASCII letters in any case:
    MAIL, whose parameters may lengthen it)."""

    __slots__ = ("max_line_bytes", "extended", "extra_bytes", "discarding", "_scanned")

    def __init__(self, max_line_bytes: int, extended: bytes = b"", extra_bytes: int = 0
                 ) -> None:
        self.max_line_bytes = max_line_bytes
        self.extended = extended.upper()
        self.extra_bytes = extra_bytes if extended else 0
        self.discarding = False  # inside an over-long line, dropping bytes up to its LF
        # How many bytes after `start` are known to hold no LF. Relative to `start`, so
        # it stays true when the buffer is compacted or replaced.
        self._scanned = 0

    def next_line(self, buf: bytearray, start: int, end: int) -> tuple[int, int]:
        """Return (lf, begin): the next line is buf[begin:lf] and its LF is at `lf`.

        Or `lf` is NEED_MORE or TOO_LONG and `begin` is the offset consumed up to. Plain
        ints, not a line object: this runs once per command, and the caller trims the CR.
        """
        lf = buf.find(b"\n", start + self._scanned, end)
        self._scanned = 0
        if self.discarding:
            if lf < 0:
                return NEED_MORE, end  # drop it all, still inside the long line
            self.discarding = False
            start = lf + 1
            lf = buf.find(b"\n", start, end)
        if lf < 0:
            if end - start >= self.max_line_bytes and end - start >= self._limit(buf, start):
                self.discarding = True
                return TOO_LONG, end
            self._scanned = end - start
            return NEED_MORE, start
        if lf + 1 - start > self.max_line_bytes and lf + 1 - start > self._limit(buf, start):
            return TOO_LONG, lf + 1
        return lf, start

    def _limit(self, buf: bytearray, start: int) -> int:
        """The limit of the line at `start`, past max_line_bytes only (seldom asked)."""
        extended = self.extended
        if extended and buf[start:start + len(extended)].upper() == extended:
            return self.max_line_bytes + self.extra_bytes
        return self.max_line_bytes

    def reset(self) -> None:
        self.discarding = False
        self._scanned = 0


class BodyScanner:
    """Walks a dot-stuffed body; each `step()` finds at most one piece of body.

    After `step(buf, pos, end)` returns the offset to resume from, the piece is either
    `buf[start:stop]` (a zero-copy slice, possibly empty) or, when `copied` is not None,
    those bytes instead; `done` means the terminator ended just before the returned
    offset. A return equal to `pos` (and not done) means: more bytes are needed.

    Bodies without stuffed dots cost a memchr and at most one `find` per read (and a
    `startswith` where it finds the terminator, so that a short body and its end go in
    one step) and are never copied. Once
    a stuffed dot turns up, the rest of the read is unstuffed in bulk with one C-level
    `replace` up to the terminator (or up to the last bytes that could begin one, which
    are kept for the next read): a body whose every line starts with "." would otherwise
    cost a Python step, an event and a write per line.
    """

    __slots__ = ("at_line_start", "start", "stop", "copied", "done")

    def __init__(self) -> None:
        self.at_line_start = True  # the next byte begins a line (true when DATA begins)
        self.start = self.stop = 0
        self.copied: bytes | None = None
        self.done = False

    def step(self, buf: bytearray, pos: int, end: int) -> int:
        self.copied = None
        self.start = self.stop = pos
        if self.at_line_start:
            if pos >= end:
                return pos
            if buf[pos] == DOT:
                if end - pos < 3:
                    if end - pos == 1 or buf[pos + 1] == CR:
                        return pos  # "." or ".\r": could be the end
                elif buf[pos + 1] == CR and buf[pos + 2] == LF:
                    self.done = True
                    return pos + 3
                pos += 1  # a stuffing dot: drop it, the line goes on
                self.start = self.stop = pos
            self.at_line_start = False
        # A single-byte find is memchr: a run with no dot at all (base64, the bulk of large
        # mail) has neither a terminator nor stuffing, and skips the 3-byte search.
        dot = buf.find(b".", pos, end)
        hit = -1 if dot < 0 else buf.find(b"\r\n.", max(pos, dot - 2), end)
        if hit > pos:
            if buf.startswith(TERMINATOR, hit, end):  # the end, whole: body and end at once
                self.stop = hit + 2  # the terminator's first CRLF is body
                self.done = True
                return hit + 5
            self.stop = hit  # plain body up to the next "\r\n."
            return hit
        if hit == pos:
            return self._unstuff_run(buf, pos, end)
        if pos == end:
            return pos
        last = buf[end - 1]
        if last == CR:
            self.stop = end - 1  # keep the CR: it may start a CRLF
            return end - 1
        self.stop = end
        self.at_line_start = last == LF and end - pos >= 2 and buf[end - 2] == CR
        return end

    def _unstuff_run(self, buf: bytearray, pos: int, end: int) -> int:
        r"""From a "\r\n." at `pos`: unstuff up to the terminator or the safe end."""
        term = buf.find(TERMINATOR, pos, end)
        if term >= 0:
            stop, resume = term + 2, term + 5  # the terminator's first CRLF is body
            self.done = True
        else:
            stop = resume = _safe_end(buf, pos, end)
        if stop - pos > 2:
            self.copied = buf[pos:stop].replace(b"\r\n.", b"\r\n")
        else:
            self.stop = stop  # just the CRLF before the terminator, or nothing yet
        return resume


TERMINATOR = b"\r\n.\r\n"


def _safe_end(buf: bytearray, pos: int, end: int) -> int:
    """`end`, less any trailing bytes that could begin a terminator."""
    for keep in (4, 3, 2, 1):
        if end - keep >= pos and buf[end - keep:end] == TERMINATOR[:keep]:
            return end - keep
    return end


# An LF without its CR. A regex with a literal first byte lets sre jump from LF to LF in
# C, about one byte per cycle; two bytes.count() passes were 3x slower on typical bodies.
_LF_WITHOUT_CR = re.compile(rb"\n(?<!\r\n)").search
find_bare_lf = _LF_WITHOUT_CR  # on a piece's own view, where nothing lies before it

# Long lines (998-octet lines, a multi-megabyte body) are cheaper hopped over: a one-byte
# find is memchr, dozens of bytes per cycle, so a Python step per line beats sre's byte
# loop once lines run to a few hundred bytes. Small pieces and short lines stay with sre.
HOP_PIECE_BYTES = 16 * 1024  # pieces from this size on try hopping first
_SHORT_LINE = 256  # a line shorter than this is a strike against hopping
_STRIKES = 4  # after this many short lines, sre scans the rest of the piece


def has_bare_lf(data: bytes | bytearray, start: int, end: int,
                hop_from: int = HOP_PIECE_BYTES) -> bool:
    """Whether `data[start:end]` (a body piece) holds an LF without a CR just before it
    in the piece. An LF that opens a piece is bare: no CRLF spans two pieces."""
    if start >= end:
        return False
    if data[start] == LF:
        return True
    pos = start + 1  # from here on the byte before any LF lies inside the piece
    if end - start >= hop_from:
        find, strikes = data.find, 0
        while strikes < _STRIKES:
            lf = find(b"\n", pos, end)
            if lf < 0:
                return False
            if data[lf - 1] != CR:
                return True
            if lf - pos < _SHORT_LINE:
                strikes += 1
            pos = lf + 1
    return _LF_WITHOUT_CR(data, pos, end) is not None


_BARE_LF_DOT = re.compile(rb"\n(?<!\r\n)\.?").subn
# sre rewrites a bare LF in some 60 ns, a Python-level match each: fine for a few, but a
# body of bare LFs would cost 60 ms a MiB. Past one bare LF in this many bytes, C-level
# `replace` passes do the same in about 10 ms a MiB whatever the density.
SPARSE_BYTES_PER_LF = 64


def normalize_bare_lf(piece: memoryview | bytes, after_bare_lf: bool,
                      sparse_bytes_per_lf: int = SPARSE_BYTES_PER_LF) -> bytes:
    """`piece` with every bare LF made CRLF and the "." after each dropped (unstuffed);
    with `after_bare_lf` (the previous piece ended in a bare LF) a leading "." too.

    Exact for any bytes, whatever the scanner's pieces look like: sre takes a piece with
    few bare LFs (its output is kept only if it found them all), `_normalize_dense` the
    rest, and both give what one `sub` of the regex would."""
    data = bytes(piece)
    if after_bare_lf and data[:1] == b".":
        data = data[1:]
    most = len(data) // sparse_bytes_per_lf + 1  # never 0, which would mean "no limit"
    out, found = _BARE_LF_DOT(b"\r\n", data, most)
    return out if found < most else _normalize_dense(data)


def _normalize_dense(data: bytes) -> bytes:
    r"""Bare LF -> CRLF and one "." after it dropped, in whole-piece passes.

    A dot after a CRLF is doubled first, so that dropping one dot after every LF leaves
    it as it was and drops only those after a bare LF; no byte before an LF changes on
    the way, so the LFs that were bare stay bare. Then CRLF -> LF, LF -> CRLF. A
    one-byte `in` (memchr) skips the passes that have nothing to do.
    """
    if b"." in data:
        if b"\r" in data:
            data = data.replace(b"\r\n.", b"\r\n..")
        data = data.replace(b"\n.", b"\n")
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    return data.replace(b"\n", b"\r\n")


def normalized_size(data: bytes | bytearray, start: int, stop: int,
                    after_bare_lf: bool) -> int:
    """`len(normalize_bare_lf(data[start:stop], after_bare_lf))`, counted in place: each
    bare LF adds its CR, each "." dropped after one takes a byte off. No copy is made,
    and a one-byte `find` (memchr) skips the counts that cannot find anything."""
    size = stop - start
    if after_bare_lf and size and data[start] == DOT:
        size -= 1  # the LF before it was bare: a stuffing dot
    lfs = data.count(b"\n", start, stop)
    if not lfs:
        return size
    has_cr = data.find(b"\r", start, stop) >= 0
    bare = lfs - data.count(b"\r\n", start, stop) if has_cr else lfs
    if bare and data.find(b".", start, stop) >= 0:
        bare -= data.count(b"\n.", start, stop)
        if has_cr:
            bare += data.count(b"\r\n.", start, stop)
    return size + bare
