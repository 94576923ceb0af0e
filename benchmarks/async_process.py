"""The async keyed processes' rows of ``make bench`` (issue 14), on the run's cluster.

* ``async_call``: ``ref.call`` round trip to an ``async def`` keyed process (:class:`AsyncEcho`,
  ms), checked against row 4: sampled by :meth:`~benchmarks.cluster.ForsetiBench.round_trips`
  in the same blocks as row 4 (:func:`start` makes its key), so that load from elsewhere hits
  both alike. What it adds to a call is awaiting the handler (a coroutine run without the loop).
* ``async_uss``: unique set size of idle async keyed processes (MiB), checked against row 6's
  sync ones. :class:`AsyncEcho`'s hooks do not await, so it runs without building its event loop
  (``forseti_celery/child/lazyloop.py``); the run's notes also give the same processes' USS once
  each has built and run its loop (a ``"loop"`` call), which costs ~0.9 MB more (see
  ``docs/asyncio.rst``, "Memory").
"""

from __future__ import annotations

import asyncio
import os
import statistics
import uuid
from typing import TYPE_CHECKING, Any

from benchmarks.common import log, measure, uss_mib
from forseti_celery import KeyedProcess

if TYPE_CHECKING:
    from benchmarks.cluster import ForsetiBench

__all__ = ["NAME", "AsyncEcho", "measure_rows", "start"]

#: The keyed-process name :class:`AsyncEcho` is registered under (``benchmarks.app``).
NAME = "async-echo"
#: How many idle async processes ``async_uss`` measures (row 6 measures 20 sync ones).
PROCESSES = 20


class AsyncEcho(KeyedProcess):
    """:class:`~benchmarks.app.Echo` written with ``async def`` (no ``await``: no loop until
    ``"loop"``, which has it built and run)."""

    async def init(self, key: str, *args: Any) -> None:
        self.casts = 0

    async def handle_call(self, msg: Any) -> Any:
        if msg == "pid":
            return os.getpid()
        if msg == "loop":
            self.create_task(asyncio.sleep(0))
        return msg

    async def handle_cast(self, msg: Any) -> None:
        self.casts += 1


def start(bench: ForsetiBench) -> Any:
    """The key of row ``async_call``: a new :class:`AsyncEcho`, called once."""
    ref = bench.forseti.get_key(f"aecho-rtt-{uuid.uuid4().hex[:6]}", name=NAME)
    ref.call(0)
    return ref


def measure_rows(bench: ForsetiBench) -> None:
    """Row ``async_uss`` into the run's results (``async_call`` is measured with row 4)."""
    r, tag = bench.run.results, uuid.uuid4().hex[:6]
    refs = [bench.forseti.get_key(f"aecho-{tag}-{i}", name=NAME) for i in range(PROCESSES)]
    try:
        for ref in refs:
            ref.call("pid")
        measure(r, "async_uss", lambda: [uss_mib(ref.pid) for ref in refs])
        lazy = statistics.median(uss_mib(ref.pid) for ref in refs)
        for ref in refs:
            ref.call("loop")
            ref.call("pid")  # on the loop now: the task has run
        looped = statistics.median(uss_mib(ref.pid) for ref in refs)
        note = f"USS per idle async keyed process (median): {lazy:.2f} MiB without its loop, {looped:.2f} MiB with it"
        bench.run.notes.append(note)
        log(f"  {note}")
    finally:
        for ref in refs:
            ref.stop()
