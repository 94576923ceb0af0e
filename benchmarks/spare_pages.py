"""What a zygote spare costs, step by step, outside a cluster: ``python -m benchmarks.spare_pages [N]``.

A process importing what a worker imports starts a :class:`~forseti_celery.worker.pool.zygote.Zygote`,
has it fork ``N`` spares (default 40), gives each a key of :class:`benchmarks.app.Echo`, then half of
them a call and a second one. Printed as medians: the zygote's page faults and CPU per fork, each
spare's faults and CPU to take its key and for its first and second call (``/proc/<pid>/stat``,
``schedstat``), and its USS (``smaps_rollup``) as a spare, started, and after a call (row 6 of
``make bench`` measures keys called once). Page counts are stable under load; CPU figures are not.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import billiard.connection
import celery.apps.worker  # noqa: F401 - what a worker has imported, the zygote's image
import kombu.transport.pyamqp
import kombu.transport.redis  # noqa: F401

import forseti_celery.worker.node  # noqa: F401
from benchmarks.app import Echo
from benchmarks.common import uss_mib
from forseti_celery.child import runtime
from forseti_celery.core import protocol as p
from forseti_celery.core.conf import ChildConfig
from forseti_celery.core.messages import Call
from forseti_celery.core.pipe import Assign
from forseti_celery.worker.pool import zygote as zygote_mod
from forseti_celery.worker.pool.fork import KeyedChild


def _faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[7])


def _cpu_ms(pid: int) -> float:
    with open(f"/proc/{pid}/schedstat") as fh:
        return int(fh.read().split()[0]) / 1e6


def _step(pid: int, conn: Any, frame: bytes) -> tuple[int, float]:
    """Faults and CPU (ms) of ``pid`` while it answers ``frame``."""
    f0, c0 = _faults(pid), _cpu_ms(pid)
    conn.send_bytes(frame)
    conn.recv_bytes()
    time.sleep(0.002)  # its write comes before it waits again: let it get there
    return _faults(pid) - f0, _cpu_ms(pid) - c0


def main(n: int = 40) -> dict[str, float]:
    config = ChildConfig()
    zygote = zygote_mod.Zygote(KeyedChild, config, runtime.Lifeline(fence_after=60.0, check_every=0.5),
                               lambda name: Echo, [])
    spares: list[tuple[Any, Any]] = []
    try:
        time.sleep(0.3)
        zpid = zygote.process.pid
        f0, c0 = _faults(zpid), _cpu_ms(zpid)
        while len(spares) < n:
            for got in zygote.fork_many(min(zygote_mod.MAX_BATCH, n - len(spares))):
                if not isinstance(got, OSError):
                    spares.append((got[0], billiard.connection.Connection(got[1])))
        time.sleep(0.5)  # every spare rehearsed and waiting
        out = {"zygote faults per fork": (_faults(zpid) - f0) / n, "zygote CPU ms per fork": (_cpu_ms(zpid) - c0) / n,
               "USS MiB, spare": statistics.median(uss_mib(s.pid) for s, _ in spares)}
        took = [_step(s.pid, conn, p.encode([Assign("default", f"k{i}", [], None, 0, "s").to_wire()]))
                for i, (s, conn) in enumerate(spares)]
        out["USS MiB, started"] = statistics.median(uss_mib(s.pid) for s, _ in spares)
        called = spares[: n // 2]
        calls = [[_step(s.pid, conn, p.encode([p.encode_message(Call("q", "n", 0, "default", f"c{j}").to_wire(),
                                                                   "message", config.max_message_size, payload=j)]))
                  for j in range(2)] for s, conn in called]
        out["USS MiB, after a call"] = statistics.median(uss_mib(s.pid) for s, _ in called)
        steps = (("key", took), ("first call", [c[0] for c in calls]), ("second call", [c[1] for c in calls]))
        for label, rows in steps:
            out[f"faults, {label}"] = statistics.median(r[0] for r in rows)
            out[f"CPU ms, {label}"] = statistics.median(r[1] for r in rows)
        out["faults, spare in all"] = statistics.median(_faults(s.pid) for s, _ in called)
        return out
    finally:
        for s, conn in spares:
            s.kill()
            conn.close()
        zygote.stop()


if __name__ == "__main__":
    for name, value in main(int(sys.argv[1]) if len(sys.argv) > 1 else 40).items():
        print(f"{name:28} {value:8.3f}")
