"""Reading a small file that an operator names (the configuration, a users file, a TLS
certificate or key), in a process that must not hang or grow on it.

Untrusted input: the path and what lies there. A FIFO would hang a plain open() (opening
with O_NONBLOCK does not), /dev/zero never ends, a directory reads as an error only later,
and a huge file would keep the reader busy for minutes: so only a regular file is read,
and never more than its limit plus one byte (which says it is too large).
"""

from __future__ import annotations

import os
import stat


class NotRegularFile(Exception):
    """The path names something other than a regular file (`is_dir`: a directory)."""

    def __init__(self, is_dir: bool) -> None:
        super().__init__("Is a directory" if is_dir else "not a regular file")
        self.is_dir = is_dir


class TooLarge(Exception):
    """The file holds more than the limit."""


def read_small_file(path: str, limit: int) -> bytes:
    """The bytes of the regular file at `path`, at most `limit` of them. Raises OSError
    (it cannot be opened or read), NotRegularFile or TooLarge."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(stat.S_ISDIR(mode))
        chunks, size = [], 0
        while size <= limit:  # at most the limit plus one byte
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise TooLarge(f"larger than {limit} bytes")
    return b"".join(chunks)
