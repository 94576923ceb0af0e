"""The forseti_celery and Celery columns of ``make bench``: a three-worker cluster of
:mod:`benchmarks.app` on one broker, a client app next to it, and the rows measured on them."""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import async_process, lifecycle
from benchmarks.common import (
    ROOT,
    ForsetiRun,
    Sizes,
    Stat,
    log,
    measure,
    mem_available_mib,
    prefault,
    repeat_ms,
    timed,
    uss_mib,
    wait_until,
)
from benchmarks.floor import Floor
from benchmarks.probe import probe as _probe
from benchmarks.solo import Solo

#: Memory to touch for each key a row creates, in MiB: what the 2048 MiB measured for 310 keys came to
#: (a keyed process takes 2.2 of USS, row 6; the rest is its page tables, the spare forked after it, the kernel).
_MIB_PER_NEW_KEY = 6


class ForsetiBench:
    """A three-worker cluster of :mod:`benchmarks.app` on one broker, and a client app next to it."""

    def __init__(self, kind: str, url: str, redis_backend: str | None, sizes: Sizes, signed: bool = False,
                 zygote: str = "fork") -> None:
        import secrets

        from benchmarks.app import REDIS_BACKEND_ENV, make_app
        from forseti_celery import Forseti
        from forseti_celery.testing import Cluster, short_hostname

        self.run = ForsetiRun(kind, url, signed=signed)
        self.sizes = sizes
        self.namespace = f"forseti-bench{uuid.uuid4().hex[:8]}"
        tag = self.namespace[-4:]
        # The secret for the workers only: the client (this process) never holds it.
        self.env = {"FORSETI_NAMESPACE": self.namespace, REDIS_BACKEND_ENV: redis_backend or "",
                    "FORSETI_WORKER_SECRET": secrets.token_urlsafe(32) if signed else "", "FORSETI_ZYGOTE": zygote}
        self.hostnames = [f"bench{i}-{tag}@{short_hostname()}" for i in (1, 2, 3)]
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"forseti-bench-{kind}-"))
        self.cluster = Cluster("benchmarks.app", 3, broker_url=url, env=self.env, cwd=str(ROOT),
                               log_dir=self.log_dir, hostnames=self.hostnames)
        self.make_app = make_app
        self.redis_backend = redis_backend
        self.app = make_app(url, self.namespace, redis_backend)
        self.forseti = Forseti.of(self.app)
        self._apps = [self.app]
        self.refs: list[Any] = []
        #: The floor column (the relay of benchmarks.floor) and the solo-pool Celery task.
        self.floor = Floor(kind, url)
        self.solo = Solo(url, redis_backend, str(ROOT), tag)

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> ForsetiBench:
        return self

    def __exit__(self, *exc: object) -> None:
        from forseti_celery import Forseti

        for app in self._apps:
            with contextlib.suppress(Exception):
                Forseti.of(app).client.close()
            with contextlib.suppress(Exception):
                app.close()
        with contextlib.suppress(Exception):
            self.floor.stop()
        with contextlib.suppress(Exception):
            self.solo.stop()
        t0 = time.monotonic()
        orphans = self.cluster.stop()
        self.stop_seconds = time.monotonic() - t0
        if orphans:
            self.run.notes.append(f"workers left {len(orphans)} orphan processes (killed)")
        self._clean_broker()
        log(f"{self.run.kind}: workers stopped in {self.stop_seconds:.1f} s; logs in {self.log_dir}")

    def start(self, baselines: bool = True) -> None:
        """Start the workers (and, with ``baselines``, the floor's relay and the solo worker)."""
        from forseti_celery.testing import wait_for

        t0 = time.monotonic()
        self.cluster.start()
        if baselines:
            self.floor.start()
            self.solo.start()

        def three() -> bool:
            try:
                return len(self.forseti.get_metrics(timeout=2)) == 3
            except Exception:
                return False

        wait_for(three, 60, 0.1, lambda: f"the cluster never listed 3 workers\n{self.cluster.log_tails()}")
        st = self.forseti.settings
        self.run.notes.append(f"3 workers `celery worker -P {self.cluster.pool} -c {self.cluster.concurrency}`, "
                              f"forseti_heartbeat={st.heartbeat:g} s, forseti_node_timeout={st.node_timeout:g} s, "
                              f"forseti_lease={st.lease:g} s (Redis leader lease)")
        log(f"{self.run.kind}: 3 workers up in {time.monotonic() - t0:.1f} s ({self.url_shown})")

    @property
    def url_shown(self) -> str:
        return self.run.url.replace("guest:guest@", "")

    def _clean_broker(self) -> None:
        """Drop what the namespace left on the broker (queues and keys; best effort)."""
        with contextlib.suppress(Exception):
            if self.run.url.startswith("redis://"):
                import redis

                with redis.Redis.from_url(self.run.url) as r:
                    for key in r.scan_iter(match=f"*{self.namespace}*", count=1000):
                        r.delete(key)
            elif self.run.url.startswith(("amqp", "pyamqp")):
                from kombu import Connection, Queue

                from forseti_celery.core.protocol import Names

                names = Names(self.namespace, single_active_consumer=True)
                queues = [names.leader_queue, Queue(f"{self.namespace}.tasks")]
                queues += [names.node_queue(h) for h in self.hostnames]
                with Connection(self.run.url) as conn:
                    channel = conn.channel()
                    for queue in queues:
                        with contextlib.suppress(Exception):
                            queue(channel).delete()
                    for exchange in (names.exchange, names.bcast_exchange):
                        with contextlib.suppress(Exception):
                            exchange(channel).delete()

    # -- the rows -------------------------------------------------------------------------------
    def measure_all(self) -> ForsetiRun:
        s, r = self.sizes, self.run.results
        self._warm_up()
        self._prefault("rows 1-2b", s.cold + 50 * (s.batches + s.thread_batches))
        measure(r, "cold", lambda: repeat_ms(self._cold, s.cold))
        measure(r, "batch", lambda: [self._batch(f"b{i}", threads=0) for i in range(s.batches)])
        measure(r, "batch_threads", lambda: [self._batch(f"t{i}", threads=8) for i in range(s.thread_batches)])
        measure(r, "lookup_fresh", self.fresh_lookups)
        measure(r, "cli_get", self.cli_commands)
        self.round_trips()
        measure(r, "ka_revive", lambda: [1000 * timed(lifecycle.revive(self, f"revive-{i}", sends=False))
                                         for i in range(s.lifecycle)])
        measure(r, "ka_revive_held", lambda: [1000 * timed(lifecycle.revive(self, f"held-{i}", sends=True))
                                              for i in range(s.lifecycle)])
        measure(r, "restart", lambda: lifecycle.restarts(self))
        measure(r, "task_tput", self.task_throughput)
        measure(r, "send", self.send_throughput)
        measure(r, "uss", lambda: [uss_mib(x.pid) for x in self.refs[:20]])
        measure(r, "create_many", self.create_many)
        measure(r, "lookup_many", self.lookups_new_client)
        measure(r, "lookup_many_warm", lambda: repeat_ms(
            lambda _: self.forseti.get_key(random.choice(self.refs).key), s.warm))
        lifecycle.failover(self)
        return self.run

    def _warm_up(self) -> None:
        """Open every connection and reply queue once, so no row pays for it."""
        self.forseti.get_metrics()
        warm = self.forseti.get_key("warm-up")
        warm.call(0)
        for name in self.task_names.values():
            self.app.tasks[name].delay(0).get(timeout=10)

    @property
    def task_names(self) -> dict[str, str]:
        """Result backend -> name of the echo task storing its results there."""
        return {"rpc://": "benchmarks.echo", **({"redis": "benchmarks.echo_redis"} if self.redis_backend else {})}

    def round_trips(self) -> None:
        """Task round trips (each result backend), calls and warm lookups, interleaved in blocks
        so that a burst of load from elsewhere on the machine hits them alike."""
        s, r = self.sizes, self.run.results
        ref, key = self.refs[0], self.refs[0].key
        aref = async_process.start(self)  # row 16 beside row 4, in the same blocks
        samplers: dict[str, tuple[Callable[[int], Any], int]] = {
            "call": (lambda i: ref.call(i), s.rtt),
            "lookup_warm": (lambda _: self.forseti.get_key(key), s.warm),
            "ka_call": (lambda i: self.forseti.call(key, i), s.rtt),
            "async_call": (lambda i: aref.call(i), s.rtt),
        }
        for backend, name in self.task_names.items():
            samplers[f"task {backend}"] = (self._task_call(name), s.tasks)
        for backend, name in self.solo.backends.items():
            samplers[f"solo {backend}"] = (self.solo.caller(name), s.tasks)
        samplers["floor_rt"] = (self.floor.call, s.rtt)
        samples: dict[str, list[float]] = {name: [] for name in samplers}
        blocks = 5
        t0 = time.monotonic()
        for _ in range(blocks):
            for name, (fn, n) in samplers.items():
                try:
                    samples[name] += repeat_ms(fn, max(1, n // blocks))
                except Exception as exc:
                    r[name] = Stat(note=f"failed: {type(exc).__name__}: {exc}"[:200])
        best = _fastest_backend(samples, "task ")
        if best:
            shown, backend, values = best
            self.run.notes.append(f"Celery task round trip `echo.delay(x).get()` (median): {shown}; "
                                  f"the table uses {backend}, the faster")
            self.task_backend = backend
            r["task_rt"] = Stat(values, note=backend)
        best = _fastest_backend(samples, "solo ")
        if best:
            shown, backend, values = best
            self.run.notes.append(f"the same task in a `celery worker -P solo` (median): {shown}; the table "
                                  f"uses {backend}")
            r["task_rt_solo"] = Stat(values, note=backend)
        with contextlib.suppress(Exception):
            aref.stop()
        for name in ("call", "lookup_warm", "ka_call", "async_call", "floor_rt"):
            if name not in r:
                r[name] = Stat(samples[name])
        for name in ("task_rt", "task_rt_solo", "floor_rt", "call", "lookup_warm", "ka_call", "async_call"):
            stat = r.get(name, Stat(note="failed"))
            log(f"  {name}: " + (f"median {stat.median:.4g} p90 {stat.p90:.4g}" if stat.ok else stat.note))
        log(f"  (round trips: {time.monotonic() - t0:.1f} s)")

    def _task_call(self, name: str) -> Callable[[int], Any]:
        task = self.app.tasks[name]
        return lambda i: task.delay(i).get(timeout=10)

    def task_throughput(self) -> list[float]:
        """``n`` ``echo.delay`` then every ``.get()``: tasks/s through the three workers."""
        task = self.app.tasks[self.task_names.get(getattr(self, "task_backend", "rpc://"), "benchmarks.echo")]
        out = []
        for _ in range(2):
            t0 = time.perf_counter()
            pending = [task.delay(i) for i in range(self.sizes.task_tput)]
            for res in pending:
                res.get(timeout=60)
            out.append(self.sizes.task_tput / (time.perf_counter() - t0))
        return out

    def _prefault(self, rows: str, keys: int) -> None:
        """Touch the memory ``keys`` new keyed processes will take (see
        :func:`~benchmarks.common.prefault`), at most a quarter of what is free; noted with its cost
        a page (10 us and more: pages the host had taken back)."""
        mib = int(min(keys * _MIB_PER_NEW_KEY, mem_available_mib() / 4))
        if mib > 0:
            self.run.notes.append(f"{rows}: {mib:,} MiB touched first, {prefault(mib):.1f} us a page")

    def _cold(self, i: int) -> None:
        ref = self.forseti.get_key(f"cold-{i}")
        ref.call(i)
        self.refs.append(ref)

    def _batch(self, prefix: str, threads: int) -> float:
        keys = [f"{prefix}-{i}" for i in range(50)]
        t0 = time.perf_counter()
        if threads:
            with ThreadPoolExecutor(threads) as pool:
                refs = list(pool.map(self.forseti.get_key, keys))
        else:
            refs = [self.forseti.get_key(k) for k in keys]
        rate = len(keys) / (time.perf_counter() - t0)
        self.refs.extend(refs)
        return rate

    def fresh_lookups(self) -> Stat:
        """A new Python process builds the client and looks up two existing keys (times sent back)."""
        firsts, seconds, closes, floors = [], [], [], []
        env = {**os.environ, "FORSETI_BROKER_URL": self.run.url, **self.env}
        for i in range(self.sizes.fresh):
            a, b = self.refs[2 * i].key, self.refs[2 * i + 1].key
            out = _probe(["forseti", a, b], env)
            firsts.append(out["first_ms"])
            seconds.append(out["second_ms"])
            closes.append(out["close_ms"])
            try:
                floors.append(self.floor.first_request())
            except Exception as exc:  # the forseti figures stand without it
                self.run.results["floor_first"] = Stat(note=f"failed: {type(exc).__name__}: {exc}"[:200])
        self.run.results["lookup_fresh_connect"] = Stat(firsts)
        if floors:
            self.run.results["floor_first"] = Stat(floors)
        self.run.results["close_fresh"] = Stat(closes)
        return Stat(seconds)

    def cli_commands(self) -> Stat:
        """``celery -A benchmarks.app forseti get KEY`` as a user runs it, timed from outside
        (start-up, lookup, close), and the same start-up with ``--help`` (row 9a)."""
        env = {**os.environ, "FORSETI_BROKER_URL": self.run.url, **self.env}
        base = [sys.executable, "-m", "celery", "-A", "benchmarks.app", "forseti"]
        gets: list[float] = []
        helps: list[float] = []
        for i in range(self.sizes.fresh):
            for argv, into in ((["get", self.refs[i].key], gets), (["--help"], helps)):
                t0 = time.perf_counter()
                subprocess.run(base + argv, env=env, cwd=str(ROOT), capture_output=True, timeout=60, check=True)
                into.append((time.perf_counter() - t0) * 1000)
        self.run.results["cli_help"] = Stat(helps)
        return Stat(gets)

    def send_throughput(self) -> list[float]:
        """``n`` sends to one key, then one call that sees them all (order is kept per client)."""
        ref = self.forseti.get_key("send-target")
        out = []
        for _ in range(self.sizes.send_reps):
            base = ref.call("count")
            n = self.sizes.sends
            t0 = time.perf_counter()
            for i in range(n):
                ref.send(i)
            count = ref.call("count", timeout=60)
            elapsed = time.perf_counter() - t0
            if count != base + n:
                raise RuntimeError(f"{count - base} of {n} sends seen by the call after them")
            out.append(n / elapsed)
        return out

    def create_many(self) -> Stat:
        """Bring the live keys up to N (capped by free memory), with 8 client threads."""
        want = self.sizes.many
        uss = self.run.results.get("uss")
        per_key = uss.median if uss is not None and uss.ok else 10.0
        fits = int(mem_available_mib() * 0.5 / max(per_key, 0.1))
        if fits < want:
            self.run.notes.append(f"row 7/8: {want} keys would not fit in half the free memory; used {fits}")
            want = fits
        missing = [f"many-{i}" for i in range(max(0, want - len(self.refs)))]
        self._prefault("row 7a", len(missing))
        created = 0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            for start in range(0, len(missing), 50):
                if time.perf_counter() - t0 > self.sizes.many_budget:
                    self.run.notes.append(f"rows 7/8: stopped creating keys after {self.sizes.many_budget:g} s "
                                          f"(N below {want:,})")
                    break
                self.refs.extend(pool.map(self.forseti.get_key, missing[start:start + 50]))
                created += len(missing[start:start + 50])
        elapsed = time.perf_counter() - t0
        self.run.many = self._check_count()
        log(f"  {self.run.many} live keys ({created} created in {elapsed:.1f} s)")
        return Stat([created / elapsed] if created else [], note="" if created else "none created")

    def _check_count(self) -> int:
        """The leader's count of live keys; a note if it differs from the keys this run created."""
        expected = {ref.key for ref in self.refs} | {"warm-up", "send-target"}

        def total() -> int:
            return sum(self.forseti.get_metrics().values())

        if wait_until(lambda: total() == len(expected), 3.0):
            return len(expected)
        other = self.other_client()
        lost = sorted(key for key in expected if other.search_key(key) is None)
        self.run.notes.append(f"odd: the leader counts {total()} live keys, this run created {len(expected)}; "
                              f"not found: {lost[:5]}{' ...' if len(lost) > 5 else ''}")
        return total()

    def other_client(self) -> Any:
        """A second client in this process: its own connection, reply queue and (empty) cache."""
        from forseti_celery import Forseti

        if len(self._apps) == 1:
            self._apps.append(self.make_app(self.run.url, self.namespace))
            Forseti.of(self._apps[1]).get_metrics()
        return Forseti.of(self._apps[1])

    def lookups_new_client(self) -> Stat:
        """The second client (nothing cached) looks up distinct random existing keys."""
        other = self.other_client()
        keys = random.sample([ref.key for ref in self.refs], min(self.sizes.many_lookups, len(self.refs)))
        return Stat(repeat_ms(lambda i: other.get_key(keys[i]), len(keys)))


def _fastest_backend(samples: dict[str, list[float]], prefix: str) -> tuple[str, str, list[float]] | None:
    """Of the samplers named ``prefix + backend``: every backend's median shown, the fastest backend and
    its samples; ``None`` when none has samples."""
    runs = {name[len(prefix):]: v for name, v in samples.items() if name.startswith(prefix) and v}
    if not runs:
        return None
    best = min(runs, key=lambda b: statistics.median(runs[b]))
    shown = ", ".join(f"{b} {statistics.median(v):.2f} ms" for b, v in runs.items())
    return shown, best, runs[best]
