"""The Ray column of ``make bench``: the same rows with Ray named actors (the ``bench`` extra); rows
17-17d with Ray async actors (:mod:`benchmarks.ray_aio`)."""

from __future__ import annotations

import logging
import os
import random
import statistics
import time
import uuid
from typing import Any

from benchmarks.common import Results, Sizes, Stat, log, measure, repeat_ms, uss_mib
from benchmarks.probe import probe as _probe
from benchmarks.ray_aio import measure_ray_rows


def bench_ray(sizes: Sizes) -> tuple[Results, list[str], str]:
    """The same rows with Ray named actors; returns (results, notes, column status)."""
    try:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray
    except ImportError:
        return {}, [], "ray not installed"
    results: Results = {}
    notes: list[str] = []
    namespace = f"forseti-bench{uuid.uuid4().hex[:8]}"

    @ray.remote
    class EchoActor:
        def __init__(self) -> None:
            self.casts = 0

        def echo(self, x: Any) -> Any:
            return x

        def cast(self, x: Any) -> None:
            self.casts += 1

        def count(self) -> int:
            return self.casts

        def pid(self) -> int:
            return os.getpid()

    def get(name: str) -> Any:
        return EchoActor.options(name=name, get_if_exists=True, lifetime="detached").remote()  # type: ignore[attr-defined]

    t0 = time.monotonic()
    ctx = ray.init(num_cpus=2, include_dashboard=False, namespace=namespace, log_to_driver=False,
                   logging_level=logging.ERROR)
    address = str(ctx.address_info["address"])  # type: ignore[attr-defined]
    log(f"ray {ray.__version__}: local cluster up in {time.monotonic() - t0:.1f} s")
    actors: list[Any] = []
    names: list[str] = []
    try:
        def cold(i: int) -> None:
            actor = get(f"cold-{i}")
            ray.get(actor.echo.remote(i))
            actors.append(actor)
            names.append(f"cold-{i}")

        def batch(prefix: str) -> float:
            batch_names = [f"{prefix}-{i}" for i in range(sizes.ray_batch)]
            t0 = time.perf_counter()
            handles = [get(n) for n in batch_names]
            ray.get([h.echo.remote(0) for h in handles])
            rate = len(handles) / (time.perf_counter() - t0)
            actors.extend(handles)
            names.extend(batch_names)
            return rate

        def fresh() -> Stat:
            runs = [_probe(["ray", names[2 * i], names[2 * i + 1], address, namespace], dict(os.environ))
                    for i in range(sizes.ray_fresh)]
            # Row 3a: ray.init (connecting) + the first get_actor, as forseti's first get_key connects.
            results["lookup_fresh_connect"] = Stat([out["first_ms"] for out in runs])
            parts = {name: statistics.median(out[name] for out in runs)
                     for name in ("import_ms", "init_ms", "get_actor_ms")}
            notes.append(f"Ray: row 3a is `ray.init(address=...)` {parts['init_ms']:.1f} ms + the first "
                         f"`ray.get_actor` {parts['get_actor_ms']:.2f} ms (medians; `import ray` "
                         f"{parts['import_ms']:.0f} ms, not counted)")
            return Stat([out["second_ms"] for out in runs])

        def sends() -> list[float]:
            actor = actors[0]
            base = ray.get(actor.count.remote())
            t0 = time.perf_counter()
            for i in range(sizes.ray_sends):
                actor.cast.remote(i)
            if ray.get(actor.count.remote()) != base + sizes.ray_sends:
                raise RuntimeError("casts missing")
            return [sizes.ray_sends / (time.perf_counter() - t0)]

        measure(results, "cold", lambda: repeat_ms(cold, sizes.ray_cold))
        measure(results, "batch", lambda: [batch("b0")])
        if sizes.ray_batch != 50:
            notes.append(f"Ray: row 2 with a batch of {sizes.ray_batch}, not 50 (quick run)")
        # .remote() returns at once and actors start concurrently: threads add nothing.
        results["batch_threads"] = Stat(note="as row 2")
        measure(results, "lookup_fresh", fresh)
        measure(results, "lookup_warm", lambda: repeat_ms(lambda _: ray.get_actor(names[0]), sizes.warm))
        measure(results, "call", lambda: repeat_ms(lambda i: ray.get(actors[0].echo.remote(i)), sizes.rtt))
        measure(results, "send", sends)
        measure(results, "uss", lambda: [uss_mib(ray.get(a.pid.remote())) for a in actors[:20]])
        measure(results, "lookup_many", lambda: repeat_ms(lambda _: ray.get_actor(random.choice(names)), sizes.warm))
        results["lookup_many"].note = f"{len(actors)} actors"
        results["failover"] = Stat(note="n/a")
        uss, rate = results["uss"], results["batch"]
        if uss.ok and rate.ok:
            notes.append(f"Ray: row 7 with the {len(actors)} actors of rows 1-2: 1,000 at the measured "
                         f"{rate.median:.1f} actors/s and {uss.median:.0f} MiB each would take "
                         f"{1000 / rate.median / 60:.0f} min and {uss.median * 1000 / 1024:.0f} GiB")
        notes.append("Ray: row 8 has no equivalent on one local Ray node")
        measure_ray_rows(ray, sizes, results, notes)  # rows 17-17d: async actors (benchmarks.ray_aio)
    finally:
        ray.shutdown()
    return results, notes, f"ray {ray.__version__}"

