"""Log lines held in shared memory: whole lines out, in order, once; a dead worker's rest
written by its master."""

from __future__ import annotations

import os
import signal

import pytest
from support.logstreams import Budget

from minismtp import logboard
from minismtp.logboard import ATOMIC_BYTES, SLOT_BYTES, LogBoard, write_lines


@pytest.fixture
def board():
    made = LogBoard(4)
    yield made
    made.close()


@pytest.fixture
def pipe():
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)

    def read() -> bytes:
        chunks = []
        while True:
            try:
                chunk = os.read(read_end, 1 << 16)
            except BlockingIOError:
                return b"".join(chunks)
            chunks.append(chunk)

    yield write_end, read
    os.close(read_end)
    os.close(write_end)


def lines(count: int, width: int = 100, tag: str = "L") -> list[bytes]:
    return [f"{tag}{n:05d} ".encode().ljust(width - 1, b"x") + b"\n" for n in range(count)]


def test_held_lines_go_out_in_order_in_whole_line_pieces(board, pipe, monkeypatch):
    fd, read = pipe
    slot = board.slot(1)
    sent = lines(250)
    for start in range(0, len(sent), 7):  # a turn's lines at a time
        assert slot.add(b"".join(sent[start:start + 7]))
    pieces: list[bytes] = []
    real_write = os.write
    monkeypatch.setattr(logboard.os, "write",
                        lambda fd, data: pieces.append(bytes(data)) or real_write(fd, data))
    assert slot.write_out(fd) == 250 * 100
    assert read() == b"".join(sent)
    assert len(pieces) > 1
    assert all(len(piece) <= ATOMIC_BYTES and piece.endswith(b"\n") for piece in pieces)
    assert slot.waiting == 0 and slot.held == 0
    assert slot.write_out(fd) == 0 and read() == b""  # nothing twice


def test_a_turn_that_does_not_fit_is_refused_whole(board):
    slot = board.slot(0)
    big = b"".join(lines(SLOT_BYTES // 100))
    assert slot.add(big)
    room = SLOT_BYTES - len(big)
    assert not slot.add(b"x" * room + b"\n")  # one byte too many
    assert slot.held == len(big)
    assert slot.add(b"x" * (room - 1) + b"\n")


def test_a_line_longer_than_a_pipe_write_goes_alone(board, pipe):
    fd, read = pipe
    slot = board.slot(2)
    long_line = b"y" * (ATOMIC_BYTES + 500) + b"\n"
    assert slot.add(b"short\n" + long_line + b"last\n")
    assert slot.next_piece() == b"short\n"
    os.write(fd, b"short\n")
    slot.mark_written(len(b"short\n"))
    assert slot.next_piece() == long_line
    slot.write_out(fd)
    assert read() == b"short\n" + long_line + b"last\n"


def test_slots_are_apart(board, pipe):
    fd, read = pipe
    board.slot(0).add(b"zero\n")
    board.slot(3).add(b"three\n")
    assert board.recover(3, fd) == 6
    assert read() == b"three\n"
    assert board.slot(0).waiting == 5


def test_the_master_writes_what_a_killed_worker_held_and_not_what_it_wrote(board, pipe):
    """A child process (the worker) writes part of its slot out, holds the rest, and is
    killed with SIGKILL; the parent (the master) writes exactly the rest."""
    fd, read = pipe
    sent = lines(120)
    pid = os.fork()
    if pid == 0:  # the worker: no return from here
        try:
            slot = board.slot(2)
            slot.add(b"".join(sent[:60]))
            piece = slot.next_piece()  # what one write takes, then it is counted
            os.write(fd, piece)
            slot.mark_written(len(piece))
            slot.add(b"".join(sent[60:]))
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    first = read()
    assert 0 < len(first) < 60 * 100  # one piece, written by the worker itself
    assert board.recover(2, fd) == 120 * 100 - len(first)
    assert first + read() == b"".join(sent)
    assert board.recover(2, fd) == 0  # the slot is empty for the next worker


@pytest.mark.parametrize("held, written", [(0, 3 * 100), (3 * 100, 3 * 100), (5 * 100, 2 * 100)])
def test_the_master_writes_exactly_what_the_counts_say_is_left(board, pipe, held, written):
    """Whatever instruction a SIGKILL came at, the counts say what is left: (0, N) is a
    reset half done (`held` zeroed first), (N, N) a write counted and not yet reset."""
    fd, read = pipe
    slot = board.slot(1)
    sent = b"".join(lines(5))
    slot.add(sent)
    slot._counts[0], slot._counts[1] = held, written
    assert board.recover(1, fd) == max(0, held - written)
    assert read() == sent[written:held]
    assert (slot.held, slot.waiting) == (0, 0)


def test_a_slot_handed_out_again_starts_empty(board, pipe):
    fd, read = pipe
    board.slot(1).add(b"left by the last worker\n")
    board.hand_out(1)
    assert board.recover(1, fd) == 0 and read() == b""


def test_write_lines_cuts_only_after_a_newline(pipe, monkeypatch):
    fd, read = pipe
    data = b"".join(lines(100, width=77))
    pieces: list[bytes] = []
    real_write = os.write
    monkeypatch.setattr(logboard.os, "write",
                        lambda fd, piece: pieces.append(bytes(piece)) or real_write(fd, piece))
    write_lines(fd, data)
    assert read() == data
    assert all(len(p) <= ATOMIC_BYTES and p.endswith(b"\n") for p in pieces)
    assert len(pieces) == -(-len(data) // (ATOMIC_BYTES // 77 * 77))


def test_a_worker_holding_lines_wakes_up_to_write_them(board):
    """The loop's poll timeout ends when held lines are due, not at the next tick."""
    from minismtp.config import load_config
    from minismtp.delivery.null import DiscardBackend
    from minismtp.heartbeat import HeartbeatBoard
    from minismtp.stats import StatsBoard
    from minismtp.worker import Worker

    beats, stats = HeartbeatBoard(1), StatsBoard(1, 64)
    worker = Worker(load_config(), [], DiscardBackend(), beats, 0, stats, log_board=board)
    try:
        assert worker.msglog.due == float("inf")
        assert worker._select_timeout(50.0) == 1.0  # idle: the once-a-second tick
        worker.msglog.due = 50.04
        assert worker._select_timeout(50.0) == pytest.approx(0.04)
        worker.msglog.due = 49.0
        assert worker._select_timeout(50.0) == 0.0
    finally:
        worker.poller.close()
        worker.wakeup.close()
        beats.close()
        stats.close()


def Taking(size: int) -> Budget:  # noqa: N802 (read as a kind of stream)
    """A stream that takes `size` bytes in all, then nothing."""
    return Budget(size, left=size)


def test_room_written_out_is_used_again_before_the_slot_empties(board):
    slot = board.slot(0)
    sent = lines(300)
    assert slot.add(b"".join(sent))
    stream = Taking(20_050)  # 200 lines and a half out, 99 and a half waiting
    slot.write_out(stream)
    more = lines(30, tag="M")
    assert slot.add(b"".join(more))  # 30,000 + 3,000 bytes did not fit; 13,000 do
    assert slot.held == 300 * 100 - 20_050 + 30 * 100
    stream.left = 1 << 20
    slot.write_out(stream)
    assert bytes(stream.out) == b"".join(sent + more)
    assert (slot.held, slot.waiting) == (0, 0)


def test_a_slot_more_than_half_waiting_refuses_what_does_not_fit(board):
    slot = board.slot(0)
    assert slot.add(b"".join(lines(300)))
    slot.write_out(Taking(10_000))  # 20,000 wait: they would overlap their copy
    assert not slot.add(b"".join(lines(30)))
    assert (slot.held, slot.waiting) == (30_000, 20_000)


class Killed(Exception):
    pass


class KilledAt:
    """A slot's counts, where a SIGKILL comes before the store number `stores`."""

    def __init__(self, counts, stores: int) -> None:
        self.counts = counts
        self.left = stores

    def __getitem__(self, index: int) -> int:
        return self.counts[index]

    def __setitem__(self, index: int, value: int) -> None:
        if not self.left:
            raise Killed
        self.left -= 1
        self.counts[index] = value


@pytest.mark.parametrize("stores", [0, 1, 2, 3])
def test_a_worker_killed_while_its_slot_makes_room_loses_no_line(board, pipe, stores):
    fd, read = pipe
    slot = board.slot(3)
    sent = lines(300)
    slot.add(b"".join(sent))
    slot.write_out(Taking(20_050))  # in the middle of a line
    counts = slot._counts
    more = b"".join(lines(30, tag="M"))  # no room after `held`: a move to the front
    slot._counts = KilledAt(counts, stores)
    try:
        added = slot.add(more)
    except Killed:
        added = False
    slot._counts = counts
    board.recover(3, fd)
    assert read() == b"".join(sent)[20_050:] + (more if added else b"")
    assert added == (stores == 3)
