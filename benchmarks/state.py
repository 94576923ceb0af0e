"""The state rows of ``make bench`` (issue 13): what a checkpoint adds to a call.

``checkpoint_cost``: a real keyed process (forked, driven over its real pipe as its worker drives
it) answers calls that checkpoint (``self.checkpoint()``: ``snapshot()``, JSON, one Lua
compare-and-set round trip to Redis) and calls that do not, interleaved; each sample is one pair's
difference in ms. The broker is not involved: a call through it costs the same either way, the
checkpoint is what the handler adds. Run alone: ``python -m benchmarks.state [redis-url] [calls]``.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import billiard

from benchmarks.common import Stat
from forseti_celery import KeyedProcess
from forseti_celery.child import runtime as child_main
from forseti_celery.core import protocol as p
from forseti_celery.core.conf import ChildConfig
from forseti_celery.core.pipe import Assign

if TYPE_CHECKING:
    from benchmarks.cluster import ForsetiBench

__all__ = ["checkpoint_added_ms", "checkpoint_cost"]


class Account(KeyedProcess):
    """A small movable state (a balance and the last few operations), as a typical key has."""

    def init(self, key: str) -> None:
        self.balance, self.last = 0, list[Any]()

    def handle_call(self, msg: Any) -> Any:
        self.balance += 1
        self.last = [*self.last[-9:], {"op": "add", "n": 1, "by": "client-1"}]
        if msg:
            self.checkpoint()
        return self.balance

    def snapshot(self) -> Any:
        return {"balance": self.balance, "last": self.last}

    def restore(self, state: Any) -> None:
        self.balance, self.last = state["balance"], state["last"]


def checkpoint_added_ms(url: str, calls: int) -> list[float]:
    """ms a checkpoint adds to a call: ``calls`` pairs (one that checkpoints, one that does not)."""
    namespace = f"bench-state-{uuid.uuid4().hex[:8]}"
    config = ChildConfig(fence_after=3600.0, state_url=url, namespace=namespace)
    ours, theirs = billiard.Pipe(duplex=True)
    lifeline = child_main.Lifeline(fence_after=3600.0, check_every=1.0)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the keyed process
        code = 1
        try:
            ours.close()
            child_main.run(theirs, config, lifeline, lambda name: Account, parent, [])
            code = 0
        finally:
            os._exit(code)
    theirs.close()

    def call(checkpoint: bool) -> float:
        t0 = time.perf_counter()
        ours.send_bytes(p.encode([{"t": "call", "n": "account", "k": "a", "r": "r", "c": "c", "m": checkpoint}]))
        ours.recv_bytes()
        return (time.perf_counter() - t0) * 1000

    try:
        ours.send_bytes(p.encode([Assign("account", "a", [], None, 1, "bench").to_wire()]))
        ours.recv_bytes()  # started
        for _ in range(50):  # warm: the connection to Redis, the script cached
            call(True)
            call(False)
        out = []
        for _ in range(calls):
            with_it, without = call(True), call(False)
            out.append(with_it - without)
        ours.send_bytes(p.encode([{"t": "stop", "reason": "stop"}]))  # deletes its checkpoint
        os.waitpid(pid, 0)
        return out
    finally:
        ours.close()
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def checkpoint_cost(bench: ForsetiBench) -> Stat:
    """The row: on the run's Redis (its result backend's, which every run has when Redis runs)."""
    url = bench.redis_backend
    if not url:
        return Stat(note="n/a (no Redis for checkpoints)")
    return Stat(checkpoint_added_ms(url, max(200, bench.sizes.rtt * 4)))


if __name__ == "__main__":
    samples = checkpoint_added_ms(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0",
                                  int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
    stat = Stat(samples)
    print(f"checkpoint adds to a call: median {stat.median:.3f} ms, p90 {stat.p90:.3f} ms ({len(samples)} pairs)")
