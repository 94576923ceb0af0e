"""``make bench``: forseti_celery side by side with a plain Celery task and Ray named actors.

    python -m benchmarks.run [--broker redis|rabbitmq|both] [--signing off|on|both] [--quick] [--no-ray]

For each broker it starts a cluster of three real workers of :mod:`benchmarks.app` (a
namespace and hostnames of their own), measures every row of issue 5 and prints one table
with medians, p90s, ratios and the issue's targets. With ``--signing both`` (the default) it
does so twice per broker, without and then with a worker secret (``forseti_worker_secret``:
every worker message signed and checked), and prints the cost of signing on every row. Ray
runs once (it needs no broker) and its figures appear in every table. See ``docs/benchmarks.rst``.

Broker URLs: ``FORSETI_BROKER_URL`` replaces the default of its kind; otherwise the local
Redis (db 10) and RabbitMQ when they answer, else an embedded Redis (and no RabbitMQ table).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REDIS_HOST_PORT = ("127.0.0.1", 6379)
RABBITMQ_HOST_PORT = ("127.0.0.1", 5672)
#: Redis database of the benchmark: the test suite uses (and flushes) db 9.
REDIS_DB = int(os.environ.get("FORSETI_BENCH_REDIS_DB", "10"))


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- figures --------------------------------------------------------------------------------


@dataclass
class Stat:
    """Samples of one figure for one system, or why there are none."""

    samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p90(self) -> float:
        if len(self.samples) < 2:
            return self.samples[0]
        return statistics.quantiles(self.samples, n=10, method="inclusive")[8]


Results = dict[str, Stat]


@dataclass(frozen=True)
class Row:
    """One line of the table: which figure, its unit, and the issue's target for forseti."""

    id: str
    label: str
    unit: str
    higher_is_better: bool = False
    #: Text of the target, and a check on (forseti median, baseline median or None).
    target: str = ""
    check: Callable[[float, float | None], bool] | None = None
    #: Which result of the Celery/Ray columns this row is compared with.
    celery: str | None = None
    ray: str | None = None
    #: Another forseti row this one is checked against (the check's second argument).
    versus: str | None = None


def _half_of_task(value: float, task: float | None) -> bool:
    return task is not None and value <= task / 2


ROWS = [
    Row("cold", "1  cold get_key + first call", "ms", target="<= 10 ms", check=lambda v, _: v <= 10, ray="cold"),
    Row("batch", "2  batch of 50 new keys, sequential", "keys/s", True, ">= 200/s", lambda v, _: v >= 200,
        ray="batch"),
    Row("batch_threads", "2b batch of 50 new keys, 8 threads", "keys/s", True, ">= 200/s", lambda v, _: v >= 200,
        ray="batch_threads"),
    Row("lookup_fresh", "3  lookup, fresh client process", "ms", target="<= task/2", check=_half_of_task,
        celery="task_rt", ray="lookup_fresh"),
    Row("lookup_fresh_connect", "3a   same, first request (connects)", "ms", ray="lookup_fresh_connect"),
    Row("lookup_warm", "3b lookup, warm client (same key)", "ms", target="<= 0.05 ms", check=lambda v, _: v <= 0.05,
        ray="lookup_warm"),
    Row("close_fresh", "3c fresh client process: close()", "ms"),
    Row("call", "4  call round trip", "ms", target="<= task/2", check=_half_of_task, celery="task_rt", ray="call"),
    Row("send", "5  send to one key", "msg/s", True, ">= 20000/s", lambda v, _: v >= 20_000, celery="task_tput",
        ray="send"),
    Row("uss", "6  USS per keyed process", "MiB", target="<= 5 MiB", check=lambda v, _: v <= 5, ray="uss"),
    Row("create_many", "7a creating the N live keys, 8 threads", "keys/s", True),
    Row("lookup_many", "7  lookup among N keys, new client", "ms", target="<= task/2", check=_half_of_task,
        celery="task_rt", ray="lookup_many"),
    Row("lookup_many_warm", "7b lookup among N keys, warm client", "ms", target="<= 0.05 ms",
        check=lambda v, _: v <= 0.05, ray="lookup_many"),
    Row("failover", "8  leader kill -> serving, N keys", "s", ray="failover"),
    Row("failover_role", "8a   kill -> role passed (event)", "s"),
    Row("failover_serve", "8b   role passed -> serving", "s", target="<= 3 s", check=lambda v, _: v <= 3),
    Row("failover_new", "8c   role passed -> new key created", "s"),
    Row("cli_get", "9  `celery forseti get`, whole command", "ms"),
    Row("cli_help", "9a   start-up alone (`forseti --help`)", "ms"),
    Row("ka_call", "10 key-addressed call, live key", "ms", target="<= 1.1x row 4",
        check=lambda v, base: base is not None and v <= 1.1 * base, versus="call"),
    Row("ka_revive", "11 passivated key, key-addressed call", "ms", target="<= 2x row 1",
        check=lambda v, base: base is not None and v <= 2 * base, versus="cold"),
    Row("ka_revive_held", "11a   same, sends were on its route", "ms", target="<= 2x row 1",
        check=lambda v, base: base is not None and v <= 2 * base, versus="cold"),
    Row("restart", "12 restart after kill -9, transient", "ms", target="<= 100 ms + 0.1 s",
        check=lambda v, _: v <= 200),
]


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def repeat_ms(fn: Callable[[int], Any], n: int) -> list[float]:
    """``n`` timings of ``fn(i)``, in milliseconds."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def measure(results: Results, name: str, fn: Callable[[], list[float] | Stat]) -> None:
    """Run one measurement; a failure becomes the figure's note instead of ending the run."""
    t0 = time.monotonic()
    try:
        got = fn()
        results[name] = got if isinstance(got, Stat) else Stat(got)
    except Exception as exc:
        results[name] = Stat(note=f"failed: {type(exc).__name__}: {exc}"[:200])
    stat = results[name]
    shown = f"median {stat.median:.4g} p90 {stat.p90:.4g}" if stat.ok else stat.note
    log(f"  {name}: {shown} ({time.monotonic() - t0:.1f} s)")


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass; whether it came true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def uss_mib(pid: int) -> float:
    """Unique set size of ``pid`` (Private_Clean + Private_Dirty), in MiB."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


def mem_available_mib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass(frozen=True)
class Sizes:
    """Repetitions per row: enough for stable medians, small enough for ~5 minutes in all."""

    cold: int
    batches: int
    thread_batches: int
    fresh: int
    warm: int
    rtt: int
    tasks: int
    sends: int
    send_reps: int
    task_tput: int
    many: int
    many_lookups: int
    many_budget: float
    ray_cold: int
    ray_batch: int
    ray_fresh: int
    ray_sends: int
    lifecycle: int

    @classmethod
    def pick(cls, quick: bool, many: int | None) -> Sizes:
        if quick:
            return cls(cold=5, batches=1, thread_batches=1, fresh=1, warm=50, rtt=50, tasks=50, sends=1000,
                       send_reps=1, task_tput=100, many=many or 150, many_lookups=30, many_budget=10, ray_cold=2,
                       ray_batch=5, ray_fresh=1, ray_sends=500, lifecycle=5)
        return cls(cold=30, batches=5, thread_batches=5, fresh=9, warm=500, rtt=500, tasks=300, sends=5000,
                   send_reps=3, task_tput=250, many=many or 1000, many_lookups=200, many_budget=75, ray_cold=6,
                   ray_batch=50, ray_fresh=3, ray_sends=5000, lifecycle=20)


# --- forseti_celery and Celery --------------------------------------------------------------


def reachable(host_port: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(host_port, timeout=1.0):
            return True
    except OSError:
        return False


class Brokers:
    """The broker URL of each kind, and the embedded Redis started for lack of one."""

    def __init__(self) -> None:
        self.embedded: Any = None
        env = os.environ.get("FORSETI_BROKER_URL", "")
        self.env_kind = "rabbitmq" if env.startswith(("amqp", "pyamqp")) else "redis" if env else ""
        self.env_url = env

    def url(self, kind: str) -> str | None:
        if kind == self.env_kind:
            return self.env_url
        if kind == "rabbitmq":
            return "amqp://guest:guest@127.0.0.1:5672//" if reachable(RABBITMQ_HOST_PORT) else None
        if reachable(REDIS_HOST_PORT):
            return f"redis://{REDIS_HOST_PORT[0]}:{REDIS_HOST_PORT[1]}/{REDIS_DB}"
        from forseti_celery.embedded import EmbeddedRedis

        self.embedded = self.embedded or EmbeddedRedis()
        return str(self.embedded.url)

    def result_redis(self, broker_url: str) -> str | None:
        """A Redis for the Celery task's Redis result backend, if there is one."""
        if broker_url.startswith("redis"):
            return broker_url
        if reachable(REDIS_HOST_PORT):
            return f"redis://{REDIS_HOST_PORT[0]}:{REDIS_HOST_PORT[1]}/{REDIS_DB}"
        return None

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()


@dataclass
class ForsetiRun:
    """Everything measured on one broker."""

    kind: str
    url: str
    results: Results = field(default_factory=dict)
    #: Whether the workers had a worker secret (signed their messages).
    signed: bool = False
    notes: list[str] = field(default_factory=list)
    many: int = 0


class ForsetiBench:
    """A three-worker cluster of :mod:`benchmarks.app` on one broker, and a client app next to it."""

    def __init__(self, kind: str, url: str, redis_backend: str | None, sizes: Sizes, signed: bool = False) -> None:
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
                    "FORSETI_WORKER_SECRET": secrets.token_urlsafe(32) if signed else ""}
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
        t0 = time.monotonic()
        orphans = self.cluster.stop()
        self.stop_seconds = time.monotonic() - t0
        if orphans:
            self.run.notes.append(f"workers left {len(orphans)} orphan processes (killed)")
        self._clean_broker()
        log(f"{self.run.kind}: workers stopped in {self.stop_seconds:.1f} s; logs in {self.log_dir}")

    def start(self) -> None:
        from forseti_celery.testing import wait_for

        t0 = time.monotonic()
        self.cluster.start()

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
        measure(r, "cold", lambda: repeat_ms(self._cold, s.cold))
        measure(r, "batch", lambda: [self._batch(f"b{i}", threads=0) for i in range(s.batches)])
        measure(r, "batch_threads", lambda: [self._batch(f"t{i}", threads=8) for i in range(s.thread_batches)])
        measure(r, "lookup_fresh", self.fresh_lookups)
        measure(r, "cli_get", self.cli_commands)
        self.round_trips()
        measure(r, "ka_revive", lambda: [1000 * timed(self._revive(f"revive-{i}", sends=False))
                                         for i in range(s.lifecycle)])
        measure(r, "ka_revive_held", lambda: [1000 * timed(self._revive(f"held-{i}", sends=True))
                                              for i in range(s.lifecycle)])
        measure(r, "restart", self.restarts)
        measure(r, "task_tput", self.task_throughput)
        measure(r, "send", self.send_throughput)
        measure(r, "uss", lambda: [uss_mib(x.pid) for x in self.refs[:20]])
        measure(r, "create_many", self.create_many)
        measure(r, "lookup_many", self.lookups_new_client)
        measure(r, "lookup_many_warm", lambda: repeat_ms(
            lambda _: self.forseti.get_key(random.choice(self.refs).key), s.warm))
        self.failover()
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
        samplers: dict[str, tuple[Callable[[int], Any], int]] = {
            "call": (lambda i: ref.call(i), s.rtt),
            "lookup_warm": (lambda _: self.forseti.get_key(key), s.warm),
            "ka_call": (lambda i: self.forseti.call(key, i), s.rtt),
        }
        for backend, name in self.task_names.items():
            samplers[f"task {backend}"] = (self._task_call(name), s.tasks)
        samples: dict[str, list[float]] = {name: [] for name in samplers}
        blocks = 5
        t0 = time.monotonic()
        for _ in range(blocks):
            for name, (fn, n) in samplers.items():
                try:
                    samples[name] += repeat_ms(fn, max(1, n // blocks))
                except Exception as exc:
                    r[name] = Stat(note=f"failed: {type(exc).__name__}: {exc}"[:200])
        tasks = {name.split(" ", 1)[1]: v for name, v in samples.items() if name.startswith("task ") and v}
        if tasks:
            best = min(tasks, key=lambda b: statistics.median(tasks[b]))
            shown = ", ".join(f"{b} {statistics.median(v):.2f} ms" for b, v in tasks.items())
            self.run.notes.append(f"Celery task round trip `echo.delay(x).get()` (median): {shown}; "
                                  f"the table uses {best}, the faster")
            self.task_backend = best
            r["task_rt"] = Stat(tasks[best], note=best)
        for name in ("call", "lookup_warm", "ka_call"):
            if name not in r:
                r[name] = Stat(samples[name])
        for name in ("task_rt", "call", "lookup_warm", "ka_call"):
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

    def _revive(self, key: str, sends: bool) -> Callable[[], Any]:
        """Create ``key`` of the name "idle" with a key-addressed call (after sends on its route
        if ``sends``), wait until it has passivated and the leader freed it; return the timed
        part: the key-addressed call that brings it back (through the old worker if ``sends``)."""
        if sends:
            self.forseti.send(key, "x", name="idle")
        self.forseti.call(key, 0, name="idle")
        if not wait_until(lambda: self.forseti.search_key(key, name="idle") is None, 10):
            raise RuntimeError(f"{key!r} never passivated")
        if not sends:  # its exit event ends the route, as it ends the cached ref
            wait_until(lambda: self.forseti.client._routes.get("idle", key) is None, 2)
        return lambda: self.forseti.call(key, 1, name="idle")

    def restarts(self) -> Stat:
        """kill -9 of a transient key's process: ms until the leader lists its restarted process
        (the restart's back-off included: 0.1 s, the first restart of a key)."""
        import signal

        out = []
        for i in range(self.sizes.lifecycle):
            key = f"restart-{i}"
            ref = self.forseti.get_key(key, name="transient")
            pid = ref.call("pid")
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            restarted = None
            deadline = t0 + 3
            while restarted is None and time.perf_counter() < deadline:
                found = self.forseti.search_key(key, name="transient", timeout=2)
                if found is not None and found.pid != pid:
                    restarted = found
                else:
                    time.sleep(0.005)
            if restarted is None:
                return Stat(note="n/a (not restarted within 3 s)")
            out.append((time.perf_counter() - t0) * 1000)
            restarted.stop()
        return Stat(out)

    def fresh_lookups(self) -> Stat:
        """A new Python process builds the client and looks up two existing keys (times sent back)."""
        firsts, seconds, closes = [], [], []
        env = {**os.environ, "FORSETI_BROKER_URL": self.run.url, **self.env}
        for i in range(self.sizes.fresh):
            a, b = self.refs[2 * i].key, self.refs[2 * i + 1].key
            out = _probe(["forseti", a, b], env)
            firsts.append(out["first_ms"])
            seconds.append(out["second_ms"])
            closes.append(out["close_ms"])
        self.run.results["lookup_fresh_connect"] = Stat(firsts)
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

    def failover(self) -> None:
        """Kill -9 the leader's worker; time until a key on a survivor is found again."""
        r = self.run.results
        try:
            stats = self.app.control.inspect(destination=self.hostnames, timeout=3).stats() or {}
            leaders = [h for h, v in stats.items() if v.get("forseti", {}).get("leader")]
            if len(leaders) != 1:
                raise RuntimeError(f"expected one leader, inspect stats says {leaders}")
            leader = leaders[0]
            probe = next(ref for ref in self.refs if ref.node != leader)
            with _leader_events(self.app, set(self.hostnames) - {leader}) as elected:
                t_kill = time.time()
                self.cluster.worker(leader).kill()
                t_served = None
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        found = self.forseti.search_key(probe.key, timeout=0.25)
                    except Exception:
                        found = None
                    if found == probe:
                        t_served = time.time()
                        break
                if t_served is None:
                    raise RuntimeError("not serving 60 s after the leader was killed")
                # A new key may belong to the dead leader's worker's keys: it waits for the
                # complete table, that is, until that worker has been declared dead.
                self.forseti.get_key(f"after-failover-{uuid.uuid4().hex[:6]}", timeout=60)
                t_new = time.time()
                wait_until(lambda: bool(elected), 1.5)  # the event may trail the answer
            r["failover"] = Stat([t_served - t_kill], note=f"killed {leader.split('@')[0]}")
            if elected:
                t_role = min(elected)
                r["failover_role"] = Stat([t_role - t_kill])
                r["failover_serve"] = Stat([max(0.0, t_served - t_role)])
                r["failover_new"] = Stat([max(0.0, t_new - t_role)])
            else:
                r["failover_role"] = Stat(note="no leader event seen")
        except Exception as exc:
            r["failover"] = Stat(note=f"failed: {type(exc).__name__}: {exc}"[:200])
        for name in ("failover", "failover_role", "failover_serve", "failover_new"):
            if name in r:
                shown = f"{r[name].median:.3g} s" if r[name].ok else r[name].note
                log(f"  {name}: {shown}")


@contextlib.contextmanager
def _leader_events(app: Any, hostnames: set[str]) -> Iterator[list[float]]:
    """Collect the times of ``forseti-leader-elected`` events from ``hostnames`` while inside."""
    times: list[float] = []
    ready = threading.Event()

    def on_event(event: dict[str, Any]) -> None:
        if event.get("hostname") in hostnames:
            times.append(float(event.get("timestamp") or event.get("local_received") or time.time()))

    conn = app.connection_for_read()
    receiver = app.events.Receiver(conn, handlers={"forseti-leader-elected": on_event})
    receiver.on_consume_ready = lambda *a, **kw: ready.set()
    thread = threading.Thread(target=lambda: receiver.capture(wakeup=False), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield times
    finally:
        receiver.should_stop = True
        thread.join(3)
        with contextlib.suppress(Exception):
            conn.release()


def _probe(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``python -m benchmarks.run --probe ...`` and return the JSON it prints."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--probe", *argv], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"probe failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return dict(json.loads(lines[-1]))


def probe_main(argv: list[str]) -> None:
    """In a fresh process: the first lookup (connecting) and the second (connected), in ms."""
    kind, first, second = argv[0], argv[1], argv[2]
    if kind == "forseti":
        from benchmarks.app import app
        from forseti_celery import Forseti

        forseti = Forseti.of(app)
        t1 = timed(lambda: forseti.get_key(first))
        t2 = timed(lambda: forseti.get_key(second))
        t3 = timed(forseti.client.close)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        ray.init(address=argv[3], namespace=argv[4], log_to_driver=False, logging_level=logging.ERROR)
        t1 = timed(lambda: ray.get_actor(first))
        t2 = timed(lambda: ray.get_actor(second))
        ray.shutdown()
    print(json.dumps({"first_ms": t1 * 1000, "second_ms": t2 * 1000,
                      **({"close_ms": t3 * 1000} if kind == "forseti" else {})}), flush=True)


# --- Ray named actors -------------------------------------------------------------------------


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
            firsts, seconds = [], []
            env = dict(os.environ)
            for i in range(sizes.ray_fresh):
                out = _probe(["ray", names[2 * i], names[2 * i + 1], address, namespace], env)
                firsts.append(out["first_ms"])
                seconds.append(out["second_ms"])
            results["lookup_fresh_connect"] = Stat(firsts)
            return Stat(seconds)

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
    finally:
        ray.shutdown()
    return results, notes, f"ray {ray.__version__}"


# --- the table ---------------------------------------------------------------------------------


def fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def cell(stat: Stat | None) -> str:
    if stat is None:
        return "-"
    if not stat.ok:
        return stat.note or "-"
    if len(stat.samples) == 1:
        return fmt(stat.median)
    return f"{fmt(stat.median)} ({fmt(stat.p90)})"


def ratio(row: Row, mine: Stat | None, other: Stat | None) -> str:
    """How forseti compares: '3.1x better' or '2.0x worse' (rates: more is better; times: less)."""
    if mine is None or other is None or not mine.ok or not other.ok or other.median == 0 or mine.median == 0:
        return "-"
    factor = mine.median / other.median
    better = factor >= 1 if row.higher_is_better else factor <= 1
    size = factor if factor >= 1 else 1 / factor
    return f"{size:.1f}x {'better' if better else 'worse'}"


def render(run: ForsetiRun, ray_results: Results, ray_status: str, ray_notes: list[str]) -> str:
    r = run.results
    head = ["row", "unit", "forseti med (p90)", "celery task", "ray actors",
            "vs task", "vs ray", "target", "ok"]
    lines = []
    for row in ROWS:
        mine = r.get(row.id)
        task = r.get(row.celery) if row.celery else None
        ray = ray_results.get(row.ray) if row.ray else None
        ray_cell = cell(ray) if ray_results else (ray_status if row.ray else "-")
        base = r.get(row.versus) if row.versus else task
        mark = ""
        if row.check is not None and mine is not None and mine.ok:
            mark = "PASS" if row.check(mine.median, base.median if base and base.ok else None) else "FAIL"
        lines.append([row.label.replace(" N ", f" {run.many:,} ") if run.many else row.label, row.unit,
                      cell(mine), cell(task), ray_cell, ratio(row, mine, task), ratio(row, mine, ray),
                      row.target, mark])
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]

    def join(cols: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) if i < 7 else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cols, widths, strict=True))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    signing = "worker secret set, messages signed" if run.signed else "no worker secret"
    out = [f"== {run.kind}: {run.url.replace('guest:guest@', '')} ({signing}) ==", join(head), sep]
    out += [join(line) for line in lines]
    out.append("")
    out.append("Medians with p90 in parentheses. vs task / vs ray: forseti's median against that column's.")
    out += [f"- {note}" for note in run.notes + ray_notes]
    return "\n".join(out)


#: The most signing may cost on a row (issue 10): past it, the secret would not be on by default.
SIGNING_BUDGET = 0.05


def render_signing(off: ForsetiRun, on: ForsetiRun) -> str:
    """The cost of signing on every row: the median of the run without a worker secret against
    the one with it (positive: slower with the secret; a rate's change is counted the same way)."""
    head = ["row", "unit", "no secret", "secret set", "cost"]
    lines = []
    for row in ROWS:
        a, b = off.results.get(row.id), on.results.get(row.id)
        cost = "-"
        if a is not None and b is not None and a.ok and b.ok and a.median and b.median:
            change = (a.median / b.median if row.higher_is_better else b.median / a.median) - 1
            cost = f"{change * 100:+.1f} %{'  (over 5 %)' if change > SIGNING_BUDGET else ''}"
        lines.append([row.label, row.unit, cell(a), cell(b), cost])
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]

    def join(cols: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cols, widths, strict=True))).rstrip()

    sign, check = signing_cost()
    out = [f"== {off.kind}: the cost of signing (forseti_worker_secret), budget 5 % per row ==", join(head),
           "  ".join("-" * w for w in widths), *[join(line) for line in lines], "",
           "Medians (p90) of two runs one after the other on the same machine: a row's noise between runs "
           "(see its p90, and rows 3b and 9a, which no worker takes part in) can exceed the budget by itself.",
           f"- measured in this process, free of that noise: {sign:.1f} us to sign a broker message of 200 bytes, "
           f"{check:.1f} us to check one (HMAC-SHA256, header, replay memory)."]
    call, cold = off.results.get("call"), off.results.get("cold")
    if call is not None and call.ok:
        # A call: one signed broker message (the reply; the request is a client's, unsigned).
        out.append(f"- a call signs its reply: {sign / 1000:.4f} ms = {sign / 10 / call.median:.2f} % of row 4")
    if cold is not None and cold.ok:
        # A new key: spawn order (signed, checked), start report (signed, checked), reply (signed).
        cost = 3 * sign + 2 * check
        out.append(f"- a new key signs 3 broker messages and checks 2: {cost / 1000:.4f} ms = "
                   f"{cost / 10 / cold.median:.2f} % of row 1")
    return "\n".join(out)


def signing_cost(n: int = 20_000) -> tuple[float, float]:
    """Microseconds to sign, and to check, one broker message of 200 bytes."""
    from types import SimpleNamespace

    from forseti_celery.core.signing import Signer

    body = b"x" * 200
    signer, checker = Signer(["s" * 43], "w1@host", 8.0), Signer(["s" * 43], "w2@host", 8.0)
    t0 = time.perf_counter()
    for _ in range(n):
        headers = signer.headers("", "forseti.node.w2@host", body)
    sign = (time.perf_counter() - t0) / n * 1e6
    messages = [SimpleNamespace(headers=signer.headers("", "forseti.node.w2@host", body), body=body,
                                delivery_info={"exchange": "", "routing_key": "forseti.node.w2@host"})
                for _ in range(n)]
    t0 = time.perf_counter()
    for m in messages:
        checker.admit(m, [])
    check = (time.perf_counter() - t0) / n * 1e6
    assert headers and not checker.dropped, "the signing benchmark's own messages did not verify"
    return sign, check


def revision() -> str:
    """The commit measured, and whether the package had uncommitted changes (figures move with them)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "forseti_celery"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes in forseti_celery/' if dirty else ''}"


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    import celery

    return (f"{os.cpu_count()} cores ({model}), {mem_available_mib() / 1024:.1f} GiB free, "
            f"Linux {platform.release()}, Python {platform.python_version()}, Celery {celery.__version__}, "
            f"load average {os.getloadavg()[0]:.2f} at start")


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe"]:
        probe_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["redis", "rabbitmq", "both"], default="both",
                        help="which broker(s) to measure forseti_celery and Celery on (default both)")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run with fewer repetitions")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray column")
    parser.add_argument("--signing", choices=["off", "on", "both"], default="both",
                        help="workers without a worker secret, with one (every worker message signed), or both "
                             "runs and the cost of signing per row (default both)")
    parser.add_argument("--keys", type=int, default=None, help="live keys for rows 7-8 (default 1000, quick 150)")
    args = parser.parse_args(argv)
    sizes = Sizes.pick(args.quick, args.keys)
    command = "python -m benchmarks.run " + shlex.join(argv)
    header = [f"forseti_celery benchmark: {command.strip()}", f"machine: {machine()}",
              f"forseti_celery: {revision()}"]
    log(header[0])
    kinds = ["redis", "rabbitmq"] if args.broker == "both" else [args.broker]
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.signing]
    started = time.monotonic()
    brokers = Brokers()
    runs: list[ForsetiRun] = []
    try:
        for kind in kinds:
            url = brokers.url(kind)
            if url is None:
                log(f"{kind}: no broker reachable, skipped")
                runs.append(ForsetiRun(kind, "not reachable", notes=["skipped: broker not reachable"]))
                continue
            for signed in modes:
                log(f"{kind}: {'with' if signed else 'without'} a worker secret")
                bench = ForsetiBench(kind, url, brokers.result_redis(url), sizes, signed=signed)
                with bench:
                    try:
                        bench.start()
                        bench.measure_all()
                    except Exception as exc:
                        first = str(exc).splitlines()[0] if str(exc) else ""
                        bench.run.notes.append(f"aborted: {type(exc).__name__}: {first}"[:300])
                        log(f"{kind}: aborted: {exc}")
                runs.append(bench.run)
        ray_results: Results = {}
        ray_notes: list[str] = []
        if args.no_ray:
            ray_status = "ray skipped"
        else:
            # Ray's raylet warnings are printed to stdout, which carries only the tables.
            with contextlib.redirect_stdout(sys.stderr):
                ray_results, ray_notes, ray_status = bench_ray(sizes)
    finally:
        brokers.close()
    header.append(f"ray: {ray_status}; whole run {time.monotonic() - started:.0f} s")
    print("\n".join(header))
    for run in runs:
        print()
        print(render(run, ray_results, ray_status, ray_notes))
    for off, on in itertools.pairwise(runs):
        if off.kind == on.kind and not off.signed and on.signed:
            print()
            print(render_signing(off, on))
    return 0


if __name__ == "__main__":
    sys.exit(main())
