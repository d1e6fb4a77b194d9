"""Spread kept-alive connections evenly over the workers.

All workers wait on one listening socket and whichever wakes first takes
the next connection, and a kept-alive connection stays with the worker that
took it.  When kube-apiserver (or a load test) opens its pool in one burst,
one worker can end up holding most of it while the other idles: measured
with 8 connections opened together, 20 times, the split was 4/4 only twice,
and 2/6 or 1/7 five times (with this table: 4/4 in 18-19 of 20, never
worse than 3/5; tests/test_fairness.py).

So each worker publishes how many connections it holds in a small table of
shared memory that the master sets up before it forks, and a worker that
holds more than its least-loaded peer stands back from accepting for a
moment, leaving the connection to that peer.  It stands back at most once
per connection, so a stuck peer slows accepting down, never stops it.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

FREE = -1  # no worker has this slot
DRAINING = -2  # the worker stopped accepting (SIGTERM): not a peer to leave connections to
# Long enough for a peer woken by the same connection to take it (tens of µs when idle, one request's
# time when busy); short, because a connection waits it out when no peer does: 2 ms cut new TLS
# connections per second from 1,250 to 800.
STAND_BACK_SECONDS = 0.0002
_INT = 4


def crowded(counts: Sequence[int], slot: int) -> bool:
    """Whether the worker in ``slot`` holds more connections than some peer that is accepting."""
    mine = counts[slot]
    return any(0 <= count < mine for index, count in enumerate(counts) if index != slot)


class ConnectionTable:
    """Connections held per worker, in memory shared across gunicorn's fork.

    The master claims a slot for each worker before forking it and frees it
    when the worker exits; the worker alone writes its count in between.
    """

    def __init__(self, slots: int) -> None:
        self._memory = mmap.mmap(-1, slots * _INT)  # anonymous and shared: inherited by every worker
        self.counts = memoryview(self._memory).cast("i")
        for index in range(slots):
            self.counts[index] = FREE

    def claim(self) -> int | None:
        """A free slot for a worker about to be forked (master only); None when all are taken."""
        for index, count in enumerate(self.counts):
            if count == FREE:
                self.counts[index] = 0
                return index
        return None

    def release(self, slot: int) -> None:
        """Free the slot of a worker that exited (master only)."""
        self.counts[slot] = FREE

    def opened(self, slot: int) -> None:
        if self.counts[slot] >= 0:
            self.counts[slot] += 1

    def closed(self, slot: int) -> None:
        if self.counts[slot] > 0:
            self.counts[slot] -= 1

    def drain(self, slot: int) -> None:
        """The worker stops accepting: peers stop leaving connections to it."""
        self.counts[slot] = DRAINING

    def crowded(self, slot: int) -> bool:
        return crowded(self.counts, slot)
