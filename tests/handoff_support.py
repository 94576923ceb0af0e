"""What issue 13's tests share: a cluster of ``tests.state_app`` workers watched by the "one live
process per key" monitor, client processes sending key-addressed messages to ``tally`` keys,
and the check of every key's count against what its senders saw acknowledged."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forseti_celery import Forseti, ForsetiError
from forseti_celery.testing import WorkerProcess, wait_for
from tests.chaos_support import Monitor, chaos
from tests.helpers import ROOT, Harness, client_app

APP = "tests.state_app"


def message(client: str, seq: int, n: int = 1) -> dict[str, Any]:
    """What a client sends a ``tally``: its ``seq``-th message to the key, adding ``n``."""
    return {"c": client, "s": seq, "n": n, "t": time.time()}


def state_cluster(broker_url: str, tmp: Path, n: int, **env: str) -> contextlib.AbstractContextManager[
        tuple[Harness, Monitor]]:
    """``n`` workers of ``tests.state_app`` (prefork), a client (its cache of refs on, as by
    default), and a monitor of every keyed process: on the way out, no orphan and no two live
    processes of a key, ever."""
    return chaos(broker_url, tmp, n=n, pool="prefork", app=APP, cache=True, **env)


def metrics(h: Harness) -> dict[str, int]:
    """The leader's count of keys per eligible worker."""
    return h.forseti.get_metrics(timeout=10)


def hosts(h: Harness) -> list[str]:
    return [w.hostname for w in h.cluster.workers if w.alive]


def worker_of_pid(h: Harness, pid: int) -> WorkerProcess | None:
    """The worker whose keyed process ``pid`` is (one of its descendants), if any."""
    return next((w for w in h.cluster.workers if w.alive and pid in w.descendants()), None)


def journal_of(h: Harness, key: str, ev: str | None = None) -> list[dict[str, Any]]:
    return [e for e in h.journal() if e["key"] == key and (ev is None or e["ev"] == ev)]


# -- client processes ------------------------------------------------------------------------------
def _client(broker_url: str, namespace: str, cid: str, keys: Sequence[str], name: str, interval: float,
            stop: Any, out: Any) -> None:
    """One client process: sends ``tally`` messages to ``keys`` in turn until ``stop`` is set,
    then one call per key (all its sends before it are handled then), and puts what each key
    was acknowledged (a send that returned, a call that answered) on ``out``."""
    f = Forseti.of(client_app(broker_url, namespace))
    seq, acked, errors = dict.fromkeys(keys, 0), dict.fromkeys(keys, 0), Counter[str]()
    i = 0
    try:
        while not stop.is_set():
            key = keys[i % len(keys)]
            seq[key] += 1
            try:
                f.send(key, message(cid, seq[key]), name=name, timeout=30)
            except ForsetiError as exc:  # refused before anything was sent: its seq is used again
                seq[key] -= 1
                errors[f"send {type(exc).__name__}: {exc}"] += 1
            else:
                acked[key] += 1
            if i == 0:
                out.put(("ready", cid))
            i += 1
            time.sleep(interval)
        for key in keys:
            seq[key] += 1
            f.call(key, message(cid, seq[key]), name=name, timeout=60)
            acked[key] += 1
        out.put(("done", {"cid": cid, "acked": acked, "errors": dict(errors)}))
    except BaseException as exc:
        out.put(("failed", f"client {cid}: {type(exc).__name__}: {exc}"))
        raise
    finally:
        f.close()


class Traffic:
    """``n`` client processes (spawned: a fresh interpreter each) sending to ``keys`` meanwhile."""

    def __init__(self, h: Harness, keys: Sequence[str], n: int = 4, name: str = "tally",
                 interval: float = 0.01) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.stop_event = self.ctx.Event()
        self.out: Any = self.ctx.Queue()
        self.procs = [self.ctx.Process(target=_client, args=(h.cluster.broker_url, h.namespace, f"c{i}", list(keys),
                                                             name, interval, self.stop_event, self.out),
                                       daemon=True) for i in range(n)]
        self.acked: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def __enter__(self) -> Traffic:
        for p in self.procs:
            p.start()
        ready = 0
        deadline = time.monotonic() + 60
        while ready < len(self.procs):
            kind, body = self._next(deadline, "every client sending")
            assert kind == "ready", body
            ready += 1
        return self

    def _next(self, deadline: float, what: str) -> tuple[str, Any]:
        try:
            return self.out.get(timeout=max(deadline - time.monotonic(), 0.1))  # type: ignore[no-any-return]
        except queue.Empty:
            raise AssertionError(f"timed out waiting for {what}") from None

    def finish(self) -> Counter[str]:
        """Stop sending; every key's acknowledged total over all clients."""
        self.stop_event.set()
        deadline = time.monotonic() + 180
        for _ in self.procs:
            kind, body = self._next(deadline, "the clients' last calls")
            assert kind == "done", body
            self.acked.update(body["acked"])
            self.errors.update(body["errors"])
        for p in self.procs:
            p.join(10)
        return self.acked

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


def check_counts(h: Harness, acked: Counter[str], keys: Sequence[str], name: str = "tally",
                 moved: bool = True) -> list[dict[str, Any]]:
    """Every key's state: its count is the sum of its acknowledged messages, none handled twice,
    none lost between two handled ones (and, if ``moved``, it moved with its state at least once)."""
    states = [h.forseti.call(key, "state", name=name, timeout=30) for key in keys]
    wrong = [(key, s["count"], acked[key], s["dups"], s["gaps"]) for key, s in zip(keys, states, strict=True)
             if (s["count"], s["dups"], s["gaps"]) != (acked[key], 0, 0)]
    assert not wrong, f"(key, count, acknowledged, twice, lost): {wrong[:10]} ({len(wrong)} keys)"
    if moved:
        stayed = [key for key, s in zip(keys, states, strict=True) if not s["restored"]]
        assert not stayed, f"never moved with its state: {stayed[:10]} ({len(stayed)} keys)"
    return states


def pauses(states: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """The longest a message waited per key (ms): (max, p99) over the keys."""
    waits = [s["delay"] * 1000 for s in states]
    return max(waits), statistics.quantiles(waits, n=100, method="inclusive")[98]


def cli(h: Harness, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    """``celery -A tests.state_app forseti ARGS`` against ``h``'s namespace; asserts its exit code."""
    env = {**os.environ, "FORSETI_BROKER_URL": h.cluster.broker_url, "FORSETI_NAMESPACE": h.namespace}
    done = subprocess.run([sys.executable, "-m", "celery", "-A", APP, "forseti", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == expect, f"exit {done.returncode} != {expect}\n{done.stdout}\n{done.stderr}"
    return done


def wait_counts(h: Harness, expected: list[int], timeout: float = 60.0) -> dict[str, int]:
    """Wait until the leader's counts per worker, sorted, are ``expected``."""
    def even() -> dict[str, int] | None:
        try:
            m = h.forseti.get_metrics(timeout=5)
        except ForsetiError:
            return None
        return m if sorted(m.values()) == expected else None
    return wait_for(even, timeout, 0.2, lambda: f"counts never {expected}: {h.forseti.get_metrics(timeout=5)}\n"
                                               f"{h.cluster.log_tails()}")
