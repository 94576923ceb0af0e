"""Passivation: when each keyed process with an ``idle_timeout`` falls idle, kept without waking it.

A keyed process's idle clock is the time the worker last wrote it a ``cast`` or ``call``
(:attr:`~forseti_celery.worker.pool.table.Child.active_at`, set by the consumer thread as it
delivers), or the last ``touch`` it wrote (a ``keep_alive`` timer fired). :class:`Idle` keeps
one entry per such process in a heap of deadlines, and the watcher folds the nearest one into
its poll timeout: no process and no thread wakes for an idle key before its deadline is due,
so a thousand idle processes cost nothing. The heap is lazy: a delivery only moves the clock,
and an entry found early at its deadline is pushed back to the new one.

At the deadline, a process with no call in progress, nothing unsent and no stop under way
passivates: the pool marks it ``passivating``, writes it a stop with reason ``"idle"`` (its
``terminate("idle")`` runs) under the table's lock, so no delivery slips in after the decision
(a key-addressed message for it from then on is held by the node; see
:mod:`~forseti_celery.worker.forwarding`), and its exit goes to the leader with reason ``idle``.

Owner: the watcher thread (the heap); the children's fields it reads and writes are the table's,
under its lock.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable

from celery.utils.log import get_logger

from ...core.pipe import StopChild
from .table import Child, Table

logger = get_logger(__name__)

__all__ = ["IDLE", "Idle"]

#: The stop reason (and exit reason) of a passivated keyed process.
IDLE = "idle"


class Idle:
    """The idle deadlines of one worker's keyed processes (watcher thread only)."""

    def __init__(self, table: Table, idle_of: Callable[[str], float | None], grace: float) -> None:
        self._table = table
        self._idle_of = idle_of
        self._grace = grace
        self._heap: list[tuple[float, int, Child]] = []
        self._order = itertools.count()  # ties: never compare two children
        self._reaped = 0  # entries of reaped children still in the heap (dropped at their deadline, or swept)

    def started(self, c: Child) -> None:
        """``c`` has started: its idle clock runs from now, if its name passivates."""
        try:
            after = self._idle_of(c.name)
        except Exception:  # a name unknown here (or a policy that cannot be read): never passivated
            logger.exception("forseti: no idle timeout for keyed process %r (%s)", c.key, c.name)
            after = None
        if after is None:
            return
        now = time.monotonic()
        with self._table.lock:
            c.idle_after = after
            c.active_at = now
        heapq.heappush(self._heap, (now + after, next(self._order), c))

    def reaped(self, c: Child) -> None:
        """``c`` has been reaped: its entry goes at its deadline, or sooner, once reaped children
        make up half the heap (an hour's ``idle_timeout`` of keys that came and went keeps no
        record of each of them for the hour)."""
        if c.idle_after is None:
            return
        self._reaped += 1
        if self._reaped > 64 and 2 * self._reaped > len(self._heap):
            self._heap = [e for e in self._heap if not e[2].gone]
            heapq.heapify(self._heap)
            self._reaped = 0

    def next_due(self) -> float | None:
        """The nearest deadline (``time.monotonic()``), None if no process passivates."""
        return self._heap[0][0] if self._heap else None

    def passivate_due(self, now: float) -> int:
        """Stop the processes idle past their deadline; returns how many."""
        heap, table, stopped = self._heap, self._table, 0
        while heap and heap[0][0] <= now:
            _, _, c = heapq.heappop(heap)
            with table.lock:
                if c.gone or c.passivating or c.kill_at is not None or c.idle_after is None:
                    if c.gone and self._reaped:
                        self._reaped -= 1
                    continue  # ended, or already on its way out: nothing to schedule
                due = c.active_at + c.idle_after
                busy = bool(c.calls) or bool(c.outbox.unsent)
                if due <= now and not busy:
                    try:
                        c.outbox.post([StopChild(IDLE, self._grace).to_wire()])
                    except OSError:
                        continue  # its pipe is closed: it has exited, and is reaped
                    c.passivating = True
                    c.kill_at = now + self._grace
                    table.dying.add(c)
                    stopped += 1
                    continue
            # Active since (or busy: looked at again one idle timeout later, when it may be idle).
            heapq.heappush(heap, (due if due > now else now + c.idle_after, next(self._order), c))
        return stopped
