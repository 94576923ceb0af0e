"""The lifecycle rows of ``make bench`` (11, 12, 8): a passivated key brought back, a restart
after kill -9, and the leader's failover."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from benchmarks.common import Stat, log, wait_until

if TYPE_CHECKING:
    from benchmarks.cluster import ForsetiBench


def revive(bench: ForsetiBench, key: str, sends: bool) -> Callable[[], Any]:
    """Create ``key`` of the name "idle" with a key-addressed call (after sends on its route
    if ``sends``), wait until it has passivated and the leader freed it; return the timed
    part: the key-addressed call that brings it back (through the old worker if ``sends``)."""
    if sends:
        bench.forseti.send(key, "x", name="idle")
    bench.forseti.call(key, 0, name="idle")
    if not wait_until(lambda: bench.forseti.search_key(key, name="idle") is None, 10):
        raise RuntimeError(f"{key!r} never passivated")
    if not sends:  # its exit event ends the route, as it ends the cached ref
        wait_until(lambda: bench.forseti.client._routes.get("idle", key) is None, 2)
    return lambda: bench.forseti.call(key, 1, name="idle")


def restarts(bench: ForsetiBench) -> Stat:
    """kill -9 of a transient key's process: ms until the leader lists its restarted process
    (the restart's back-off included: 0.1 s, the first restart of a key)."""
    import signal

    out = []
    for i in range(bench.sizes.lifecycle):
        key = f"restart-{i}"
        ref = bench.forseti.get_key(key, name="transient")
        pid = ref.call("pid")
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        restarted = None
        deadline = t0 + 3
        while restarted is None and time.perf_counter() < deadline:
            found = bench.forseti.search_key(key, name="transient", timeout=2)
            if found is not None and found.pid != pid:
                restarted = found
            else:
                time.sleep(0.005)
        if restarted is None:
            return Stat(note="n/a (not restarted within 3 s)")
        out.append((time.perf_counter() - t0) * 1000)
        restarted.stop()
    return Stat(out)


def failover(bench: ForsetiBench) -> None:
    """Kill -9 the leader's worker; time until a key on a survivor is found again."""
    r = bench.run.results
    try:
        stats = bench.app.control.inspect(destination=bench.hostnames, timeout=3).stats() or {}
        leaders = [h for h, v in stats.items() if v.get("forseti", {}).get("leader")]
        if len(leaders) != 1:
            raise RuntimeError(f"expected one leader, inspect stats says {leaders}")
        leader = leaders[0]
        probe = next(ref for ref in bench.refs if ref.node != leader)
        with _leader_events(bench.app, set(bench.hostnames) - {leader}) as elected:
            t_kill = time.time()
            bench.cluster.worker(leader).kill()
            t_served = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    found = bench.forseti.search_key(probe.key, timeout=0.25)
                except Exception:
                    found = None
                if found == probe:
                    t_served = time.time()
                    break
            if t_served is None:
                raise RuntimeError("not serving 60 s after the leader was killed")
            # A new key may belong to the dead leader's worker's keys: it waits for the
            # complete table, that is, until that worker has been declared dead.
            bench.forseti.get_key(f"after-failover-{uuid.uuid4().hex[:6]}", timeout=60)
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
