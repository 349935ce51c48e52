"""The per-connection receive buffer: a fixed bytearray that `recv_into` fills in place.

Untrusted input: raw client bytes, any length. The buffer never grows by itself; callers
choose its capacity (small for commands; large once a body fills the small one, until the
body ends or the I/O layer trims it for a body gone slow) and the scanners consume or
discard what they have looked at, so memory stays bounded whatever the client sends.
"""

from __future__ import annotations


class ReceiveBuffer:
    """Bytes in `data[start:end]` are unconsumed; `data[end:]` is free space.

    `data` is never resized in place: a live memoryview (a body chunk handed out to the
    I/O layer) would make that raise BufferError. Compaction moves the unconsumed tail to
    the front with one same-length slice assignment; a new capacity means a new bytearray.
    """

    __slots__ = ("data", "_view", "start", "end")

    def __init__(self, capacity: int) -> None:
        self.data = _take(capacity)
        self._view = memoryview(self.data)
        self.start = 0
        self.end = 0

    @property
    def capacity(self) -> int:
        return len(self.data)

    def __len__(self) -> int:
        return self.end - self.start

    def free_view(self) -> memoryview:
        """Where the next read may land. Invalidates body chunks handed out before."""
        if self.start == self.end:
            self.start = self.end = 0
            return self._view  # all of it free: the whole view, without a slice to make
        if self.end == len(self.data) or self.start > len(self.data) // 2:
            self._compact()
        return self._view[self.end:]

    def commit(self, n: int) -> None:
        """Record that `n` bytes were written into the last free view."""
        if n < 0 or self.end + n > len(self.data):
            raise ValueError(f"commit of {n} bytes overflows the free space")
        self.end += n

    def feed(self, data: bytes) -> int:
        """Copy in as much of `data` as fits; return how many bytes were taken."""
        view = self.free_view()
        n = min(len(view), len(data))
        view[:n] = data[:n]
        self.end += n
        return n

    def view(self, start: int, end: int) -> memoryview:
        return self._view[start:end]

    def resize(self, capacity: int) -> None:
        """Move the unconsumed bytes into storage of `capacity` (>= their length).

        Storage comes from and goes back to a small per-process pool, so a connection
        can hold a large buffer only while it is in DATA without paying an allocation
        per message. Views into the old storage are invalid afterwards.
        """
        pending = self.end - self.start
        if pending > capacity:
            raise ValueError("resize would drop unconsumed bytes")
        data = _take(capacity)
        data[:pending] = self._view[self.start:self.end]
        _give(self.data)
        self.data = data
        self._view = memoryview(data)
        self.start, self.end = 0, pending

    def release(self) -> None:
        """Give the storage back to the pool; the buffer is not used again."""
        _give(self.data)
        self.data = bytearray()
        self._view = memoryview(self.data)
        self.start = self.end = 0

    def _compact(self) -> None:
        pending = self.end - self.start
        self.data[:pending] = self.data[self.start:self.end]
        self.start, self.end = 0, pending


_SPARES: dict[int, list[bytearray]] = {}
_MAX_SPARES = 64  # per size: a burst of connection turnover, without hoarding memory
_MAX_SPARE_BYTES = 8 << 20  # and at most this much kept idle per size


def _take(capacity: int) -> bytearray:
    spares = _SPARES.get(capacity)
    return spares.pop() if spares else bytearray(capacity)


def _give(data: bytearray) -> None:
    spares = _SPARES.setdefault(len(data), [])
    if len(spares) < max(2, min(_MAX_SPARES, _MAX_SPARE_BYTES // max(1, len(data)))):
        spares.append(data)
