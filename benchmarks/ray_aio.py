"""The Ray column of rows 17-17d (issue 14): Ray's async actors, the shapes of :mod:`benchmarks.aio`.

An actor class with ``async def`` methods (a Ray async actor); one actor stands for "one key",
100 for "100 keys". From one asyncio loop in the driver (an ``ObjectRef`` is awaitable):

* ``acall_tput_1`` / ``acall_tput_100``: ``IN_FLIGHT`` (1,000) slots, each awaiting
  ``actor.echo.remote(i)`` and calling again once answered, until ``total`` are answered.
* ``sync_loop_100``: ``ray.get(actor.echo.remote(i))`` over the 100 actors, one at a time.
* ``acall_rt``: ``await actor.echo.remote(i)`` with one in flight (ms).
* ``acall_mem``: the driver's USS growth (MiB) with 10,000 awaits in flight to an actor whose
  method waits until released: Ray keeps a call's state in C++ (core worker), which Python's
  tracemalloc (forseti's figure) does not see, so USS is the figure and tracemalloc's share
  goes to the notes.

Called by :func:`benchmarks.ray_bench.bench_ray` inside its ``ray.init``.
"""

from __future__ import annotations

import asyncio
import os
import time
import tracemalloc
from typing import Any

from benchmarks.aio import IN_FLIGHT, interleaved_ms
from benchmarks.common import Results, Sizes, Stat, measure, uss_mib

__all__ = ["measure_ray_rows"]


def _async_echo() -> type:
    """The actor class, defined in a function so that Ray pickles it by value (as ``EchoActor``)."""

    class AsyncEcho:
        def __init__(self) -> None:
            self.release = asyncio.Event()

        async def echo(self, x: Any) -> Any:
            return x

        async def hold(self, x: Any) -> Any:
            await self.release.wait()
            return x

        async def open(self) -> None:
            """Releases the holds, also those that start after it (an async actor does not keep
            the order of its calls): ``reset`` once all have returned."""
            self.release.set()

        async def reset(self) -> None:
            self.release.clear()

    return AsyncEcho


async def _keep_in_flight(actors: list[Any], total: int, in_flight: int) -> float:
    counter = iter(range(total))

    async def slot() -> None:
        for i in counter:
            await actors[i % len(actors)].echo.remote(i)

    t0 = time.perf_counter()
    await asyncio.gather(*[slot() for _ in range(in_flight)])
    return total / (time.perf_counter() - t0)


def _throughput(actors: list[Any], reps: int, total: int) -> list[float]:
    async def main() -> list[float]:
        await _keep_in_flight(actors, IN_FLIGHT * 2, IN_FLIGHT)  # warm
        return [await _keep_in_flight(actors, total, IN_FLIGHT) for _ in range(reps)]

    return asyncio.run(main())


def _sync_loop(ray: Any, actors: list[Any], reps: int, total: int = 1000) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(total):
            ray.get(actors[i % len(actors)].echo.remote(i))
        out.append(total / (time.perf_counter() - t0))
    return out


def _memory_mib(holder: Any, n: int) -> tuple[float, float]:
    """(driver USS growth, tracemalloc growth) in MiB with ``n`` awaits in flight to ``holder``."""

    async def one(i: int) -> Any:
        return await holder.hold.remote(i)

    async def in_flight() -> tuple[float, int]:
        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        await asyncio.sleep(0)  # each task submits its call and awaits its ref
        await asyncio.sleep(0.5)  # the submissions leave the driver
        sizes = uss_mib(os.getpid()), tracemalloc.get_traced_memory()[0]
        await holder.open.remote()  # releases them all (max_concurrency leaves room for this call)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)  # a failure note rather than a hung run
        await holder.reset.remote()
        return sizes

    async def main() -> tuple[float, float]:
        await in_flight()  # warm: the driver's buffers, the actor's queue
        tracemalloc.start()
        try:
            uss0, traced0 = uss_mib(os.getpid()), tracemalloc.get_traced_memory()[0]
            uss1, traced1 = await in_flight()
            return uss1 - uss0, (traced1 - traced0) / 2**20
        finally:
            tracemalloc.stop()

    return asyncio.run(main())


def measure_ray_rows(ray: Any, sizes: Sizes, results: Results, notes: list[str]) -> None:
    """Rows 17-17d of Ray's column (inside ``bench_ray``'s ``ray.init``), under aio.ROWS' ids."""
    quick = sizes.rtt < 100
    reps, total, n_mem = (1, 5000, 10_000) if quick else (3, 10_000, 10_000)
    remote = ray.remote(_async_echo())
    t0 = time.monotonic()
    actors = [remote.remote() for _ in range(100)]
    ray.get([a.echo.remote(0) for a in actors])
    notes.append(f"Ray: rows 17-17d with async actors (async def methods); 100 started in "
                 f"{time.monotonic() - t0:.0f} s; {total:,} calls per sample")
    holder = remote.options(max_concurrency=n_mem + 10).remote()
    try:
        measure(results, "acall_tput_1", lambda: _throughput(actors[:1], reps, total))
        measure(results, "acall_tput_100", lambda: _throughput(actors, reps, total))
        measure(results, "sync_loop_100", lambda: _sync_loop(ray, actors, reps))

        def round_trips() -> list[float]:
            actor = actors[0]
            aio, sync = interleaved_ms(lambda i: actor.echo.remote(i), lambda i: ray.get(actor.echo.remote(i)),
                                       sizes.rtt)
            notes.append(f"Ray: row 17c: await {Stat(aio).median:.3f} ms, ray.get interleaved "
                         f"{Stat(sync).median:.3f} ms (medians)")
            return aio

        measure(results, "acall_rt", round_trips)

        def memory() -> list[float]:
            uss, traced = _memory_mib(holder, n_mem)
            notes.append(f"Ray: row 17d is the driver's USS growth ({uss:.1f} MiB); its Python "
                         f"allocations alone (tracemalloc, forseti's measure) {traced:.1f} MiB")
            return [uss]

        measure(results, "acall_mem", memory)
    finally:
        for actor in [*actors, holder]:
            ray.kill(actor)
