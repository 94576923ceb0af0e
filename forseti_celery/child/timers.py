"""A keyed process's timers: the heap of their due times, owned by the process's main thread.

The mailbox (:mod:`.runtime`) folds :meth:`Timers.wait` into the wait for its next message and
takes the timers that are due with :meth:`Timers.due`: no thread per timer, no broker round
trip, and no wake-up at all for a process without timers. A cancelled timer stays in the heap
until it comes up (or until the cancelled ones are the most of it: then the heap is rebuilt, so
a process that keeps re-arming a timeout costs memory for its live timers only).
"""

from __future__ import annotations

import heapq
import itertools
import threading

from ..core.process import Timer

__all__ = ["Timers"]

#: Below this many entries the heap is never rebuilt: cancelled timers cost nothing there.
_COMPACT_FROM = 64


class Timers:
    """The timers of one keyed process. Every method runs on its main thread (the one that
    runs its handlers): the heap has no lock, :meth:`add` refuses any other thread."""

    def __init__(self) -> None:
        #: ``(due, order, timer)``, a heap; empty means no timer (read by the mailbox, written here only).
        self.heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()  # timers due at one instant fire in the order they were set
        self._stale = 0  # cancelled timers still in the heap
        self._thread = threading.get_ident()

    def add(self, due: float, msg: object, interval: float | None, keep_alive: bool) -> Timer:
        """A new timer, first due at ``due`` (``time.monotonic()`` seconds)."""
        if threading.get_ident() != self._thread:
            # The main thread may be waiting with no timeout; a timer set elsewhere would never wake it.
            raise RuntimeError("a keyed process's timers are set from its own thread (its handlers, its function)")
        timer = Timer(due, msg, interval, keep_alive, self._cancelled)
        heapq.heappush(self.heap, (due, next(self._order), timer))
        return timer

    def wait(self, now: float) -> float | None:
        """Seconds until the next live timer is due (0 if one is), ``None`` without one."""
        heap = self.heap
        while heap and not heap[0][2].active:
            heapq.heappop(heap)
            self._stale -= 1
        return max(0.0, heap[0][0] - now) if heap else None

    def due(self, now: float) -> list[Timer]:
        """The live timers due at ``now``, in due order; a repeating one is set again for its next
        tick (the one after ``now``: ticks missed by a busy process are skipped)."""
        heap, fired = self.heap, []
        while heap and heap[0][0] <= now:
            _, _, timer = heapq.heappop(heap)
            if not timer.active:
                self._stale -= 1
                continue
            fired.append(timer)
            if timer.interval is not None:
                due = timer.due + timer.interval
                timer.due = due if due > now else now + timer.interval
                heapq.heappush(heap, (timer.due, next(self._order), timer))
        return fired

    def _cancelled(self, timer: Timer) -> None:
        # Counted as if still in the heap: a one-shot cancelled after it fired but before it was
        # handled is not, which only makes the next rebuild come a little early (it recounts).
        self._stale += 1
        if self._stale > _COMPACT_FROM and self._stale * 2 > len(self.heap):
            self.heap = [entry for entry in self.heap if entry[2].active]
            heapq.heapify(self.heap)
            self._stale = 0
