"""Timers of the supervisor loop as cancellable handles.

A cancelled timer never fires: that is the one way a timer that is no longer relevant (a run's
timeout after the run ended, a backoff after a stop) is dropped, so no callback has to check
whether it is stale.  Cancelled entries are swept out of the heap lazily, so a crash loop with
long timeouts cannot grow it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator

SWEEP_BELOW = 64  # a heap this small is swept at once; a bigger one when half is cancelled


class Timer:
    """A pending call; ``cancel()`` makes sure it never happens."""

    __slots__ = ("deadline", "seq", "fn", "_heap")

    def __init__(self, deadline: float, seq: int, fn: Callable[[], None], heap: TimerHeap):
        self.deadline = deadline
        self.seq = seq
        self.fn: Callable[[], None] | None = fn
        self._heap: TimerHeap | None = heap

    @property
    def cancelled(self) -> bool:
        return self.fn is None

    def cancel(self) -> None:
        if self.fn is not None:
            self.fn = None  # also frees what the callback holds (a run, a plugin)
            if self._heap is not None:
                self._heap.cancelled += 1

    def __lt__(self, other: Timer) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)


class TimerHeap:
    """Timers by deadline; ``len()`` counts only the ones that will still fire."""

    def __init__(self) -> None:
        self._heap: list[Timer] = []
        self._seq = itertools.count()
        self.cancelled = 0

    def push(self, deadline: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(deadline, next(self._seq), fn, self)
        heapq.heappush(self._heap, timer)
        return timer

    def __len__(self) -> int:
        return len(self._heap) - self.cancelled

    def __bool__(self) -> bool:
        return len(self) > 0

    def next_deadline(self) -> float | None:
        """The earliest deadline of a timer that will fire (cancelled ones are dropped)."""
        self._drop_cancelled_head()
        return self._heap[0].deadline if self._heap else None

    def due(self, now: float) -> Iterator[Callable[[], None]]:
        """Pop and yield the callbacks due at ``now``, earliest first."""
        while True:
            self._drop_cancelled_head()
            if not self._heap or self._heap[0].deadline > now:
                break
            timer = heapq.heappop(self._heap)
            fn, timer.fn, timer._heap = timer.fn, None, None
            assert fn is not None
            yield fn
        self._sweep()

    def _drop_cancelled_head(self) -> None:
        while self._heap and self._heap[0].fn is None:
            heapq.heappop(self._heap)._heap = None
            self.cancelled -= 1

    def _sweep(self) -> None:
        if self.cancelled and (len(self._heap) <= SWEEP_BELOW
                               or self.cancelled * 2 > len(self._heap)):
            for timer in self._heap:
                if timer.fn is None:
                    timer._heap = None
            self._heap = [t for t in self._heap if t.fn is not None]
            heapq.heapify(self._heap)
            self.cancelled = 0
