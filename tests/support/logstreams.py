"""Log streams for tests: a reader that takes a budget of bytes, then nothing."""

from __future__ import annotations


class Budget:
    """A stream whose reader takes `left` bytes, then nothing until given more (a test
    gives `size` a round by setting `left`); what it took is in `out`."""

    def __init__(self, size: int, left: int = 0) -> None:
        self.size = size
        self.left = left
        self.out = bytearray()

    def write(self, data: bytes) -> int:
        taken = min(len(data), self.left)
        self.left -= taken
        self.out += data[:taken]
        return taken
