"""Readiness for a worker's loop: `select.epoll` with a dict from descriptor to its owner.

Untrusted input: none (descriptors and masks come from the loop itself).

The `selectors` module does the same with a Python layer per call: a SelectorKey per
registration, a lookup through the file object, a list of (key, events) per wake-up.
A worker registers and unregisters every connection and wakes up for every command, so
that layer was a measurable part of each message's cost (bench/README.md); this keeps
only the dict. Where epoll is missing, `select.poll` has the same interface.

Masks are READ and WRITE (epoll's own bits). An error or hang-up on a descriptor is
reported as both, as `selectors` does, so the owner's next read or write meets it.
"""

from __future__ import annotations

import select

_EPOLL = hasattr(select, "epoll")
READ = select.EPOLLIN if _EPOLL else select.POLLIN
WRITE = select.EPOLLOUT if _EPOLL else select.POLLOUT
_TROUBLE = (select.EPOLLERR | select.EPOLLHUP) if _EPOLL else (select.POLLERR | select.POLLHUP)
_MAX_EVENTS = 256  # per wake-up; more wait for the next one (level-triggered)


class Poller:
    def __init__(self) -> None:
        self._poll = select.epoll() if _EPOLL else select.poll()
        self._owners: dict[int, object] = {}

    def register(self, fd: int, mask: int, owner: object) -> None:
        self._poll.register(fd, mask)
        self._owners[fd] = owner

    def modify(self, fd: int, mask: int) -> None:
        self._poll.modify(fd, mask)

    def hand_over(self, fd: int, owner: object) -> None:
        """`fd` stays watched as it is, for a new owner: no system call."""
        self._owners[fd] = owner

    def unregister(self, fd: int) -> None:
        self._poll.unregister(fd)
        del self._owners[fd]

    def forget(self, fd: int) -> None:
        """`fd` is about to be closed, and no other descriptor refers to its socket (a
        connection accepted by this process, never duplicated): the close takes it out
        of the epoll set, so the system call that unregister makes is not needed. Not
        for a listening socket, which every worker shares with the master."""
        del self._owners[fd]
        if not _EPOLL:
            self._poll.unregister(fd)  # poll() keeps a closed descriptor: POLLNVAL

    def __contains__(self, fd: int) -> bool:
        return fd in self._owners

    def owners(self) -> list[object]:
        return list(self._owners.values())

    def poll(self, timeout_s: float) -> list[tuple[object, int]]:
        """(owner, mask) for each ready descriptor, waiting at most `timeout_s`."""
        if _EPOLL:
            ready = self._poll.poll(timeout_s, _MAX_EVENTS)
        else:
            ready = self._poll.poll(timeout_s * 1000.0)
        owners = self._owners
        events = [(owners[fd], mask | (READ | WRITE) if mask & _TROUBLE else mask)
                  for fd, mask in ready if fd in owners]
        if len(events) != len(ready):
            self._drop_strays(ready)
        return events

    def _drop_strays(self, ready: list[tuple[int, int]]) -> None:
        """A descriptor the poller reports and nobody owns: one `forget` left watched
        because its close failed. Level-triggered, it would be reported on every wake-up."""
        for fd, _ in ready:
            if fd not in self._owners:
                try:
                    self._poll.unregister(fd)
                except (OSError, ValueError):
                    pass

    def close(self) -> None:
        if _EPOLL:
            self._poll.close()
        self._owners.clear()
