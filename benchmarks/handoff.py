"""The handoff rows of ``make bench`` (issue 13), on a cluster of their own (workers of
:mod:`benchmarks.handoff_app`, whose keys are movable), on the run's broker:

* ``rebalance_rate``: 2 workers run N keys, a third joins (``forseti_rebalance`` off), then one
  ``forseti_rebalance`` command (what ``celery forseti rebalance`` sends the leader) moves a third
  of them onto it: keys moved per second, from the command sent to its answer.
* ``handoff_pause``: then every worker in turn is shut down warm and replaced, while one client
  sends to the keys; each moved key's pause is the ``pause_ms`` of its ``forseti-process-moved``
  event (from its handoff's start to its next incarnation's start). One sample per worker shut
  down: the p99 of that step's pauses.

Run alone: ``python -m benchmarks.handoff [broker-url] [keys]``.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.common import Stat, log

if TYPE_CHECKING:
    from benchmarks.cluster import ForsetiBench

__all__ = ["handoff_figures", "measure_rows"]

ROOT = Path(__file__).resolve().parent.parent
NAME = "movable"


def p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[98]


@contextlib.contextmanager
def _moved_events(app: Any) -> Iterator[list[dict[str, Any]]]:
    """Every ``forseti-process-moved`` event of ``app``'s broker while inside."""
    received: list[dict[str, Any]] = []
    with app.connection_for_read() as conn:
        recv = app.events.Receiver(conn, handlers={"forseti-process-moved": received.append})
        thread = threading.Thread(target=recv.capture, kwargs={"wakeup": False}, daemon=True)
        thread.start()
        try:
            yield received
        finally:
            recv.should_stop = True
            thread.join(5)


def handoff_figures(url: str, keys: int) -> tuple[Stat, Stat]:
    """(keys moved per second by one rebalance, p99 handoff pause per rolling-restart step in ms)."""
    from benchmarks.handoff_app import make_app
    from forseti_celery import Forseti
    from forseti_celery.testing import Cluster, short_hostname, wait_for

    namespace = f"forseti-bh{uuid.uuid4().hex[:8]}"
    tag = namespace[-4:]
    cluster = Cluster("benchmarks.handoff_app", 2, broker_url=url, env={"FORSETI_NAMESPACE": namespace},
                      cwd=str(ROOT), log_dir=tempfile.mkdtemp(prefix="forseti-bench-handoff-"), tag=tag,
                      hostnames=[f"hand{i}-{tag}@{short_hostname()}" for i in (1, 2)])
    app = make_app(url, namespace)
    forseti = Forseti.of(app)

    def members(n: int) -> None:
        def listed() -> bool:
            try:
                return len(forseti.get_metrics(timeout=2)) == n
            except Exception:
                return False
        wait_for(listed, 60, 0.1, lambda: f"the cluster never listed {n} workers\n{cluster.log_tails()}")

    try:
        with cluster:
            members(2)
            names = [f"k{i}-{tag}" for i in range(keys)]
            for key in names:
                forseti.call(key, 0, name=NAME)
            cluster.add_worker()
            members(3)
            hosts = [w.hostname for w in cluster.workers]
            t0 = time.perf_counter()
            replies = app.control.broadcast("forseti_rebalance", arguments={"timeout": 60}, destination=hosts,
                                            reply=True, timeout=70, limit=len(hosts))
            elapsed = time.perf_counter() - t0
            moved = [m for reply in replies for body in reply.values() if "ok" in body for m in body["ok"]["moved"]]
            if not moved:
                raise RuntimeError(f"the rebalance moved nothing: {replies}")
            rate = Stat([len(moved) / elapsed])
            log(f"  rebalance: {len(moved)} of {keys} keys moved in {elapsed * 1000:.0f} ms")

            pauses: list[float] = []
            stop = threading.Event()

            def traffic() -> None:
                i = 0
                while not stop.is_set():
                    with contextlib.suppress(Exception):
                        forseti.send(names[i % keys], 1, name=NAME)
                    i += 1
                    time.sleep(0.002)
            sender = threading.Thread(target=traffic, daemon=True)
            with _moved_events(app) as events:
                sender.start()
                try:
                    for worker in list(cluster.workers):
                        seen = len(events)
                        worker.stop(60)
                        cluster.add_worker()
                        members(3)
                        step = [float(e["pause_ms"]) for e in events[seen:]]
                        if not step:
                            raise RuntimeError(f"no forseti-process-moved event when {worker.hostname} left")
                        pauses.append(p99(step))
                        log(f"  {worker.hostname} left: {len(step)} keys moved, pause p99 {pauses[-1]:.1f} ms, "
                            f"max {max(step):.1f} ms")
                finally:
                    stop.set()
                    sender.join(5)
            return rate, Stat(pauses)
    finally:
        forseti.close()


def measure_rows(bench: ForsetiBench) -> None:
    """Both rows into the run's results (their cluster runs once, for the two of them)."""
    keys = 60 if bench.sizes.lifecycle < 20 else 150
    t0 = time.monotonic()
    try:
        rate, pause = handoff_figures(bench.run.url, keys)
    except Exception as exc:
        note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        rate, pause = Stat(note=note), Stat(note=note)
    bench.run.results["rebalance_rate"], bench.run.results["handoff_pause"] = rate, pause
    for name, stat in (("rebalance_rate", rate), ("handoff_pause", pause)):
        log(f"  {name}: {f'median {stat.median:.4g} p90 {stat.p90:.4g}' if stat.ok else stat.note} "
            f"({time.monotonic() - t0:.1f} s)")


if __name__ == "__main__":
    rate, pause = handoff_figures(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/10",
                                  int(sys.argv[2]) if len(sys.argv) > 2 else 150)
    print(f"keys moved per second by a rebalance: {rate.samples[0]:.0f}/s (goal >= 200/s)")
    print(f"handoff pause p99 per rolling-restart step: {', '.join(f'{v:.1f}' for v in pause.samples)} ms "
          f"(goal <= 50 ms)")
