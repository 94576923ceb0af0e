"""The async client's rows of ``make bench`` (issue 14), on the run's cluster.

* ``acall_tput_1`` / ``acall_tput_100``: ``acall`` throughput from one event loop keeping
  ``IN_FLIGHT`` (1,000) calls in flight, to one key and to 100 keys (calls/s, one sample per
  rep). ``sync_loop_100``: the sync ``ref.call`` loop over the same 100 keys, the 4x baseline.
* ``acall_rt``: ``await ref.acall`` round trip with one call in flight (ms), interleaved with
  the sync ``ref.call`` of the same key, whose samples (``acall_rt_sync``, in the notes) this
  row is checked against: row 4 is measured apart, at another moment of a busy machine.
* ``acall_mem``: client memory (Python allocations, tracemalloc) of 10,000 ``acall``\\ s in
  flight, in MiB: the calls go to a ref on a worker that does not exist, so none is answered
  while it is measured.

Each function takes the Forseti client of the run (``bench.forseti``), so another column (Ray's
async actors) can be measured beside it with the same shapes. Run alone against a running
cluster of ``benchmarks.app``: ``python -m benchmarks.aio BROKER_URL NAMESPACE``.
"""

from __future__ import annotations

import asyncio
import sys
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from benchmarks.common import Row, Stat, measure
from forseti_celery import Forseti, KeyRef

if TYPE_CHECKING:
    from benchmarks.cluster import ForsetiBench

__all__ = ["IN_FLIGHT", "ROWS", "acall_latency_ms", "acall_throughput", "inflight_memory_mib", "interleaved_ms",
           "measure_rows", "sync_call_loop"]

#: Calls kept in flight by the throughput rows.
IN_FLIGHT = 1000


def _refs(forseti: Forseti, keys: int) -> list[KeyRef]:
    tag = uuid.uuid4().hex[:6]
    return [forseti.get_key(f"aio-{tag}-{i}") for i in range(keys)]


async def _keep_in_flight(refs: list[KeyRef], total: int, in_flight: int) -> float:
    """Calls/s of ``total`` acalls over ``refs``, ``in_flight`` at a time (a worker per slot)."""
    counter = iter(range(total))

    async def slot() -> None:
        for i in counter:
            await refs[i % len(refs)].acall(i)

    t0 = time.perf_counter()
    await asyncio.gather(*[slot() for _ in range(in_flight)])
    return total / (time.perf_counter() - t0)


def acall_throughput(forseti: Forseti, keys: int, reps: int = 3, total: int = 10_000,
                     in_flight: int = IN_FLIGHT) -> list[float]:
    """``reps`` samples of acall calls/s to ``keys`` keys, ``in_flight`` in flight from one loop."""
    refs = _refs(forseti, keys)

    async def main() -> list[float]:
        await _keep_in_flight(refs, in_flight * 2, in_flight)  # warm
        return [await _keep_in_flight(refs, total, in_flight) for _ in range(reps)]

    return asyncio.run(main())


def sync_call_loop(forseti: Forseti, keys: int, reps: int = 3, total: int = 1000) -> list[float]:
    """``reps`` samples of calls/s of the sync ``ref.call`` loop over ``keys`` keys."""
    refs = _refs(forseti, keys)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(total):
            refs[i % keys].call(i)
        out.append(total / (time.perf_counter() - t0))
    return out


def acall_latency_ms(forseti: Forseti, n: int) -> tuple[list[float], list[float]]:
    """``n`` round trips of ``await ref.acall`` with one in flight, and ``n`` of ``ref.call``,
    interleaved (ms each)."""
    ref = _refs(forseti, 1)[0]
    return interleaved_ms(ref.acall, ref.call, n)


def interleaved_ms(acall: Callable[[int], Awaitable[Any]], call: Callable[[int], Any],
                   n: int) -> tuple[list[float], list[float]]:
    """``n`` round trips of ``await acall(i)``, one in flight, and ``n`` of ``call(i)``, interleaved
    (ms each; also Ray's column, :mod:`benchmarks.ray_aio`)."""

    async def main() -> tuple[list[float], list[float]]:
        aio, sync = [], []
        for i in range(n + 20):
            t0 = time.perf_counter()
            await acall(i)
            t1 = time.perf_counter()
            call(i)
            t2 = time.perf_counter()
            if i >= 20:  # warm
                aio.append((t1 - t0) * 1000)
                sync.append((t2 - t1) * 1000)
        return aio, sync

    return asyncio.run(main())


def inflight_memory_mib(forseti: Forseti, n: int = 10_000) -> float:
    """MiB of Python allocations of ``n`` acalls in flight (task, coroutine, waiter, message)."""
    lost = KeyRef("nobody@nowhere", 1, "lost", "default", forseti.settings.namespace, forseti.app)

    async def main() -> float:
        async def in_flight(k: int) -> int:
            tasks = [asyncio.ensure_future(lost.acall(i, timeout=120)) for i in range(k)]
            await asyncio.sleep(0)  # each holds its request and awaits
            await asyncio.sleep(0)  # the requests are published
            size = tracemalloc.get_traced_memory()[0]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return size

        await in_flight(n)  # warm: buffers, the connection
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            return (await in_flight(n) - before) / 2**20
        finally:
            tracemalloc.stop()

    return asyncio.run(main())


# -- the rows of a benchmark run ---------------------------------------------------------------

#: The rows (``benchmarks.run.ROWS`` lists them): 17a's target is 10k calls/s and 4x the sync loop (17b).
ROWS = [
    Row("acall_tput_1", "17 acall, 1,000 in flight, one key", "calls/s", True, ray="acall_tput_1"),
    Row("acall_tput_100", "17a acall, 1,000 in flight, 100 keys", "calls/s", True, ">= 10000/s, >= 4x 17b",
        lambda v, base: v >= 10_000 and base is not None and v >= 4 * base, versus="sync_loop_100",
        ray="acall_tput_100"),
    Row("sync_loop_100", "17b sync call loop, 100 keys", "calls/s", True, ray="sync_loop_100"),
    Row("acall_rt", "17c acall round trip, one in flight", "ms", target="<= 1.1x ref.call",
        check=lambda v, base: base is not None and v <= 1.1 * base, versus="acall_rt_sync", ray="acall_rt"),
    Row("acall_mem", "17d 10,000 acalls in flight: client memory", "MiB", ray="acall_mem"),
]


def measure_rows(bench: ForsetiBench) -> None:
    """Measure :data:`ROWS` on the run's cluster (``benchmarks.run.measure_more``)."""
    r = bench.run.results
    measure(r, "acall_tput_1", lambda: tput_1(bench))
    measure(r, "acall_tput_100", lambda: tput_100(bench))
    measure(r, "sync_loop_100", lambda: sync_100(bench))
    measure(r, "acall_rt", lambda: round_trips(bench))
    measure(r, "acall_mem", lambda: memory(bench))


def tput_1(bench: ForsetiBench) -> list[float]:
    """Row acall_tput_1."""
    return acall_throughput(bench.forseti, 1, reps=_reps(bench))


def tput_100(bench: ForsetiBench) -> list[float]:
    """Row acall_tput_100."""
    return acall_throughput(bench.forseti, 100, reps=_reps(bench))


def sync_100(bench: ForsetiBench) -> list[float]:
    """Row sync_loop_100."""
    return sync_call_loop(bench.forseti, 100, reps=_reps(bench))


def round_trips(bench: ForsetiBench) -> list[float]:
    """Row acall_rt; its baseline, the ref.call round trips interleaved with it, goes to the
    results as ``acall_rt_sync`` (row 4 is measured apart) and to the notes."""
    aio, sync = acall_latency_ms(bench.forseti, bench.sizes.rtt)
    bench.run.results["acall_rt_sync"] = Stat(sync)
    bench.run.notes.append(f"row 17c: acall {Stat(aio).median:.3f} ms, ref.call interleaved "
                           f"{Stat(sync).median:.3f} ms (medians)")
    return aio


def memory(bench: ForsetiBench) -> Stat:
    """Row acall_mem."""
    return Stat([inflight_memory_mib(bench.forseti)])


def _reps(bench: ForsetiBench) -> int:
    return 1 if bench.sizes.rtt < 100 else 3


def _main(url: str, namespace: str) -> None:  # pragma: no cover - by hand
    from celery import Celery

    app = Celery("bench-aio", broker=url, set_as_current=False)
    app.conf.forseti_namespace = namespace
    forseti = Forseti(app)
    figures: dict[str, Any] = {
        "acall calls/s, 1 key": acall_throughput(forseti, 1),
        "acall calls/s, 100 keys": acall_throughput(forseti, 100),
        "sync call loop calls/s, 100 keys": sync_call_loop(forseti, 100),
        "MiB of 10,000 acalls in flight": inflight_memory_mib(forseti),
    }
    aio, sync = acall_latency_ms(forseti, 500)
    figures["acall ms, one in flight (median)"] = sorted(aio)[len(aio) // 2]
    figures["ref.call ms (median)"] = sorted(sync)[len(sync) // 2]
    for name, value in figures.items():
        print(f"{name}: {value}")
    forseti.close()


if __name__ == "__main__":  # pragma: no cover
    _main(sys.argv[1], sys.argv[2])
