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
