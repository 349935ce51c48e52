"""The group-commit thread at a worker's exit: the commits in flight finish, and their
results can still be taken, so each session gets its reply before it closes."""

from __future__ import annotations

import threading

from minismtp.delivery.base import DeliveryError
from minismtp.delivery.group import GroupCommitter


class SlowBackend:
    """Commits wait for `release`, as a commit waits for a slow disk."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()

    def commit_many(self, sinks: list[str]) -> list[str | DeliveryError]:
        self.started.set()
        assert self.release.wait(10)
        return [f"id-{sink}" if sink != "bad" else DeliveryError("disk full") for sink in sinks]


def test_finish_waits_for_the_commits_in_flight_and_keeps_their_results():
    backend = SlowBackend()
    committer: GroupCommitter[str] = GroupCommitter(backend)  # type: ignore[arg-type]
    committer.submit("first", "a")  # type: ignore[arg-type]
    assert backend.started.wait(5)  # on the disk now
    committer.submit("second", "bad")  # type: ignore[arg-type]
    threading.Timer(0.1, backend.release.set).start()
    committer.finish()  # returns once both are done
    done = dict(committer.take_done())
    assert done["first"] == "id-a"
    assert isinstance(done["second"], DeliveryError)
    committer.stop()  # after finish: releases the wakeup, and returns at once


def test_a_worker_says_when_a_commit_has_waited_too_long_for_the_disk(caplog):
    """An fsync that does not come back (an NFS server gone) pauses every message behind
    it without a word otherwise: the worker logs it at its tick, every 10 s while it lasts."""
    import time

    from minismtp.config import load_config
    from minismtp.delivery.null import DiscardBackend
    from minismtp.heartbeat import HeartbeatBoard
    from minismtp.logboard import LogBoard
    from minismtp.stats import StatsBoard
    from minismtp.worker import Worker

    slow = SlowBackend()

    class StuckDisk(DiscardBackend):
        commit_blocks = True

        def commit_many(self, sinks):  # type: ignore[override]
            return slow.commit_many(sinks)

    beats, stats, logs = HeartbeatBoard(1), StatsBoard(1, 64), LogBoard(1)
    worker = Worker(load_config(), [], StuckDisk(), beats, 0, stats, log_board=logs)
    try:
        worker.storage._committer.submit("session", "a")  # type: ignore[union-attr]
        assert slow.started.wait(5)
        now = time.monotonic()
        worker._tick(now + 5)
        assert "commit has waited" not in caplog.text
        worker._tick(now + 11)
        worker._tick(now + 12)  # said once per 10 s
        assert caplog.text.count("delivery: a commit has waited 11s for the disk") == 1
        slow.release.set()
        worker.storage.close()
        assert worker.storage.stalled_for(time.monotonic()) == 0.0
    finally:
        slow.release.set()
        worker.poller.close()
        worker.wakeup.close()
        beats.close()
        stats.close()
        logs.close()
