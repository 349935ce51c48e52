"""Scanners that walk the receive buffer with `find`, never line by line in Python.

Untrusted input: client bytes of any length and content. Both scanners work on
`buf[start:end]` in place and report offsets; neither copies or keeps the bytes.

Theory of operation
-------------------
Commands (`LineScanner`): a command ends at LF. A line longer than the limit is reported
once as TOO_LONG and then skipped up to its LF without being kept, so a megabyte "line"
costs no memory. Whether the LF had its CR before it is reported, and the protocol core
applies the bare-LF policy.

Body (`scan_body`): only CRLF "." CRLF ends DATA (RFC 5321 section 4.1.1.4); "\\n.\\n",
"\\r\\n.\\n", "\\n.\\r\\n" and "\\r.\\r\\n" are body bytes (the SMTP smuggling defence).
One search for b"\\r\\n." finds the terminator and every stuffed dot: the CRLF is emitted with
the text before it, and the dot is then looked at "at line start", the one bit of state
carried between calls (true when DATA begins). There a dot followed by CRLF is the end;
any other dot is a stuffing dot and is skipped (section 4.5.2). A lone trailing CR is never
emitted, since it may start the next CRLF; so every CRLF lies inside one emitted segment.
"""

from __future__ import annotations

from typing import NamedTuple

CR, LF, DOT = 0x0D, 0x0A, 0x2E


class Line(NamedTuple):
    start: int
    stop: int  # end of the text, line ending excluded
    next: int  # first byte after the line ending
    bare_lf: bool  # the line ended with LF alone


NEED_MORE = "need-more"
TOO_LONG = "too-long"


class LineScanner:
    """Finds command lines of at most `max_line_bytes` octets, line ending included."""

    __slots__ = ("max_line_bytes", "discarding", "_scanned")

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.discarding = False  # inside an over-long line, dropping bytes up to its LF
        # How many bytes after `start` are known to hold no LF. Relative to `start`, so
        # it stays true when the buffer is compacted or replaced.
        self._scanned = 0

    def next_line(self, buf: bytearray, start: int, end: int) -> tuple[str | Line, int]:
        """Return (Line | NEED_MORE | TOO_LONG, offset consumed up to)."""
        lf = buf.find(b"\n", start + self._scanned, end)
        self._scanned = 0
        if self.discarding:
            if lf < 0:
                return NEED_MORE, end  # drop it all, still inside the long line
            self.discarding = False
            start = lf + 1
            lf = buf.find(b"\n", start, end)
        if lf < 0:
            if end - start >= self.max_line_bytes:
                self.discarding = True
                return TOO_LONG, end
            self._scanned = end - start
            return NEED_MORE, start
        if lf + 1 - start > self.max_line_bytes:
            return TOO_LONG, lf + 1
        bare = lf == start or buf[lf - 1] != CR
        return Line(start, lf if bare else lf - 1, lf + 1, bare), lf + 1

    def reset(self) -> None:
        self.discarding = False
        self._scanned = 0


def scan_body(
    buf: bytearray, pos: int, end: int, at_line_start: bool
) -> tuple[int, int, int, bool, bool]:
    """Take one step through a dot-stuffed body in `buf[pos:end]`.

    Returns (seg_start, seg_stop, next_pos, at_line_start, done): `buf[seg_start:seg_stop]`
    is unstuffed body (possibly empty); scanning resumes at `next_pos` with the returned
    line-start bit. `done` means the terminator ended at `next_pos`. When nothing was
    consumed (`next_pos == pos` and not done) more bytes are needed.
    """
    if at_line_start:
        if pos >= end:
            return pos, pos, pos, True, False
        if buf[pos] == DOT:
            if end - pos < 3:
                if end - pos == 1 or buf[pos + 1] == CR:
                    return pos, pos, pos, True, False  # "." or ".\r": could be the end
            elif buf[pos + 1] == CR and buf[pos + 2] == LF:
                return pos, pos, pos + 3, True, True
            pos += 1  # a stuffing dot: drop it, the line goes on
    hit = buf.find(b"\r\n.", pos, end)
    if hit >= 0:
        return pos, hit + 2, hit + 2, True, False
    if pos == end:
        return pos, pos, pos, False, False
    last = buf[end - 1]
    if last == CR:
        return pos, end - 1, end - 1, False, False  # keep the CR: it may start a CRLF
    if last == LF and end - pos >= 2 and buf[end - 2] == CR:
        return pos, end, end, True, False
    return pos, end, end, False, False
