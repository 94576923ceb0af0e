"""What every part of ``make bench`` shares: figures (:class:`Stat`, :class:`Row`), timing helpers,
repetitions per row (:class:`Sizes`) and the brokers measured (:class:`Brokers`)."""

from __future__ import annotations

import mmap
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
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
    #: Another forseti row this one is checked against (the check's second argument); "ray.<id>": Ray's.
    versus: str | None = None
    #: Which floor figure of the run (benchmarks.floor: "floor_rt", "floor_first") bounds this row.
    floor: str | None = None




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


def prefault(mib: int) -> float:
    """Write one byte in each page of ``mib`` MiB of new memory, give it back, and return the
    microseconds a page took.

    Called just before the rows that create keys: on a virtual machine whose host backs guest memory
    on its first use and takes free memory back (this one: a virtio balloon reporting free pages), a
    page not touched lately costs 10-16 us on its first write against 1.4 for one in use shortly
    before, and each new keyed process writes a few hundred (its copies after the fork, its own
    allocations). The kernel hands the pages given back here out again first, so the keys' processes
    find them warm, whichever section of the run comes first; a run after a quiet spell had Redis,
    its first section, create keys at half RabbitMQ's rate."""
    size = mib << 20
    if size <= 0:
        return 0.0
    with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as mem:
        t0 = time.perf_counter()
        mem[::mmap.PAGESIZE] = b"\x01" * (size // mmap.PAGESIZE)
        elapsed = time.perf_counter() - t0
    return elapsed * 1e6 / max(1, size // mmap.PAGESIZE)


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

