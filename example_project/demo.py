"""A guided tour of forseti_celery on three real Celery workers: ``python -m example_project.demo``.

Uses ``FORSETI_BROKER_URL`` (or ``CELERY_BROKER_URL``) when set, else starts an embedded
Redis. Every claim it prints is also checked: the exit code is 0 only if all held. The
workers and the embedded Redis are stopped on the way out, also on error or Ctrl-C.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from kombu.utils.url import maybe_sanitize_url

import forseti_celery
from example_project import web_demo
from example_project.app import app, forseti
from forseti_celery import KeyRef, ProcessGone, RemoteError, StartError, UnknownName
from forseti_celery.embedded import EmbeddedRedis, broker_url_from_env
from forseti_celery.testing import Cluster, short_hostname, wait_for

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
WORKERS = [f"chat{i}@{short_hostname()}" for i in (1, 2, 3)]
#: Rooms alive after the placement section: a multiple of the worker count, so it splits evenly.
PLACED = 30


class DemoFailure(Exception):
    """Raised when something the demo shows did not behave as it says."""


def expect(condition: object, what: str) -> None:
    if not condition:
        raise DemoFailure(what)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and how long it took, in milliseconds."""
    t0 = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - t0) * 1000


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(3, 72 - len(title)))


def say(text: str = "") -> None:
    print(f"  {text}", flush=True)


def show_ref(ref: KeyRef) -> str:
    node, pid = ref
    return f"{node} pid {pid}"


def table(columns: dict[str, dict[str, int]]) -> None:
    """Per-worker counts, one column per snapshot, with a bar for the last one."""
    say(f"{'worker':<24}" + "".join(f"{name:>8}" for name in columns))
    last = list(columns.values())[-1]
    for host in WORKERS:
        cells = "".join(f"{col.get(host, 0):>8}" for col in columns.values())
        say(f"{host:<24}{cells}  {'#' * last.get(host, 0)}".rstrip())
    say(f"{'total':<24}" + "".join(f"{sum(col.values()):>8}" for col in columns.values()))


class Tour:
    """The demo's steps, sharing the refs it holds (so it can stop them all at the end)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.refs: dict[tuple[str, str], KeyRef] = {}

    def hold(self, ref: KeyRef) -> KeyRef:
        self.refs[(ref.name, ref.key)] = ref
        return ref

    def metrics(self) -> dict[str, int]:
        metrics = forseti_celery.get_metrics(app=app)
        return {host: metrics.get(host, 0) for host in WORKERS}

    # -- the sections -------------------------------------------------------------------------
    def get_key(self) -> None:
        section("2. get_key: one process per key, created on the least-used worker")
        for room in ("lobby", "python", "erlang"):
            ref, ms = timed(lambda: forseti_celery.get_key(room, args=(20,), app=app))  # noqa: B023 (runs now)
            self.hold(ref)
            say(f"get_key({room!r:10}) -> {show_ref(ref):<24} {ms:7.1f} ms  (new)")
        again, ms = timed(lambda: forseti_celery.get_key("lobby", app=app))
        expect(again == self.refs[("default", "lobby")], "a second get_key returned another process")
        say(f"get_key('lobby'   ) -> {show_ref(again):<24} {ms:7.1f} ms  (live one, equal ref: "
            f"{again == self.refs[('default', 'lobby')]})")
        with ThreadPoolExecutor(8) as pool:
            refs = list(pool.map(lambda _: forseti_celery.get_key("general", app=app), range(8)))
        expect(len(set(refs)) == 1, f"8 concurrent get_key('general') got {len(set(refs))} processes")
        say(f"8 threads at once get_key('general') -> {len(set(refs))} process: {show_ref(self.hold(refs[0]))}")

    def search_key(self) -> None:
        section("3. search_key: find, never create")
        found, ms = timed(lambda: forseti_celery.search_key("python", app=app))
        if found is None or found != self.refs[("default", "python")]:
            raise DemoFailure(f"search_key did not find the live key: {found}")
        say(f"search_key('python')  -> {show_ref(found):<24} {ms:6.1f} ms")
        missing, ms = timed(lambda: forseti_celery.search_key("haskell", app=app))
        expect(missing is None, "search_key found a key nobody created")
        say(f"search_key('haskell') -> {missing!s:<24} {ms:6.1f} ms")

    def call_and_send(self) -> None:
        section("4. call and send: the room's state lives in its process")
        lobby = self.refs[("default", "lobby")]
        for user in ("alice", "bob", "carol"):
            members = lobby.call({"op": "join", "user": user})
        say(f"call join x3                 -> members {members}")
        answer, ms = timed(lambda: lobby.call({"op": "post", "user": "alice", "text": "hi all"}))
        say(f"call post (alice)            -> {answer}  {ms:.1f} ms")
        say(f"call post (mallory)          -> {lobby.call({'op': 'post', 'user': 'mallory', 'text': 'hey'})}")
        lines = [("bob", "hello alice"), ("carol", "what's forseti?"), ("alice", "a process per key")]

        def post_all() -> None:
            for user, text in lines:
                lobby.send({"op": "post", "user": user, "text": text})

        _, ms = timed(post_all)
        say(f"send post x3                 -> no answer, {ms:.1f} ms for all three")
        history = lobby.call({"op": "history", "last": 4})  # after the sends: one client's messages stay ordered
        expect([m["seq"] for m in history] == [1, 2, 3, 4], f"unexpected history {history}")
        say("call history (last 4):")
        for m in history:
            say(f"    #{m['seq']} {m['user']:>6}: {m['text']}")
        stats = lobby.call({"op": "stats"})
        expect(stats["pid"] == lobby.pid and stats["posts"] == 4, f"unexpected stats {stats}")
        say(f"call stats                   -> {stats}")

    def pollers(self) -> None:
        section("5. Function form: sensor pollers that end on 'stop'")
        ops = self.hold(forseti_celery.get_key("ops", app=app))
        sensors = [forseti_celery.get_key(s, args=(0.1, "ops"), name="poller", app=app)
                   for s in ("sensor-1", "sensor-2")]
        for ref in sensors:
            say(f"get_key({ref.key!r}, name='poller') -> {show_ref(ref)}")
        for ref in sensors:
            for value in (20.5, 21.5, 22.5):
                ref.send({"reading": value})
        time.sleep(0.5)  # let them poll their devices a few times
        for ref in sensors:
            ref.send("stop")
        wait_for(lambda: all(forseti_celery.search_key(r.key, name="poller", app=app) is None for r in sensors),
                 10.0, message="pollers still registered after 'stop'")
        say("send 'stop' -> both returned; search_key(..., name='poller') -> None")
        say("their last words, posted to room 'ops' from inside the pollers:")
        for m in sorted(ops.call({"op": "history"}), key=lambda m: m["user"]):
            say(f"    {m['text']}")

    def placement(self) -> None:
        section(f"6. Placement: {PLACED} rooms across {len(WORKERS)} workers")
        before = self.metrics()
        live = sum(before.values())
        new = [f"room-{i:02d}" for i in range(live + 1, PLACED + 1)]
        refs, ms = timed(lambda: [forseti_celery.get_key(room, app=app) for room in new])
        for ref in refs:
            self.hold(ref)
        say(f"{live} rooms live; {len(new)} more created one by one in {ms:.0f} ms "
            f"({ms / max(1, len(new)):.1f} ms each)")
        after = self.metrics()
        table({"before": before, "after": after})
        expect(sorted(after.values()) == [PLACED // len(WORKERS)] * len(WORKERS), f"uneven placement {after}")
        say(f"get_less_used_node() -> {forseti_celery.get_less_used_node(app=app)}")

    def errors(self) -> None:
        section("7. When things go wrong")
        try:
            forseti_celery.get_key("Bad Room!", app=app)
            raise DemoFailure("a room with a bad name started")
        except StartError as exc:
            say(f"get_key('Bad Room!')   -> StartError ({exc.exc_type}: {exc.exc_message})")
        expect(forseti_celery.search_key("Bad Room!", app=app) is None, "a failed start stayed registered")
        say("search_key('Bad Room!') -> None: nothing stays registered")

        old = self.refs[("default", "lobby")]
        try:
            old.call({"op": "dance"})
            raise DemoFailure("an unknown op was answered")
        except RemoteError as exc:
            say(f"lobby.call(op='dance') -> RemoteError ({exc.exc_type}); the room crashed and its key is freed")
        try:
            old.call({"op": "stats"})
            raise DemoFailure("a crashed room answered")
        except ProcessGone as exc:
            say(f"lobby.call(op='stats') -> ProcessGone ({exc})")
        fresh = self.hold(forseti_celery.get_key("lobby", args=(20,), app=app))
        expect(fresh.pid != old.pid, f"get_key after ProcessGone returned the dead process {old}")
        say(f"get_key('lobby')       -> {show_ref(fresh)}, a new process with empty history: "
            f"{fresh.call({'op': 'history'})}")
        try:
            forseti_celery.get_key("x", name="auction", app=app)
            raise DemoFailure("an unregistered name started")
        except UnknownName as exc:
            say(f"get_key('x', name='auction') -> UnknownName ({exc})")

    def stop_all(self) -> None:
        section("9. Stop everything")
        before = self.metrics()
        refs = list(self.refs.values())
        with ThreadPoolExecutor(10) as pool:
            _, ms = timed(lambda: list(pool.map(lambda r: r.stop(), refs)))
        say(f"ref.stop() on {len(refs)} processes (10 threads): {ms:.0f} ms")
        # Room.terminate logs "room <key> closed (stop) ..." to its worker's log before the process exits.
        closed = [line.split("] ", 1)[-1] for w in self.cluster.workers for line in w.log_text().splitlines()
                  if " closed (stop) " in line]
        expect(len(closed) == len(refs), f"{len(refs)} rooms stopped but {len(closed)} ran terminate()")
        say(f"terminate() ran in each, e.g. {closed[0]!r}")
        after = self.metrics()
        table({"before": before, "after": after})
        expect(sum(after.values()) == 0, f"processes left after stop: {after}")
        expect(forseti_celery.search_key("lobby", app=app) is None, "a stopped key is still registered")
        try:
            refs[0].call({"op": "stats"})
            raise DemoFailure("a stopped room answered")
        except ProcessGone:
            say(f"{refs[0].key}.call(...) after stop -> ProcessGone")


def start_cluster(url: str, log_dir: str) -> Cluster:
    section("1. Cluster: three real Celery workers")
    say("the workers sign their messages with a worker secret (forseti_worker_secret) this client never holds")
    return Cluster(
        "example_project.app", len(WORKERS), broker_url=url, log_dir=log_dir, hostnames=WORKERS,
        env={"FORSETI_BROKER_URL": url, "FORSETI_WORKER_SECRET": secrets.token_urlsafe(32)}, cwd=ROOT,
        # forseti has heartbeats of its own: Celery's mingle (a 1 s wait at start) and gossip are not needed.
        extra_args=["--without-mingle", "--without-gossip"],
    )


def wait_for_workers() -> tuple[dict[str, int], float]:
    def metrics() -> dict[str, int]:
        try:
            found = forseti_celery.get_metrics(app=app, timeout=1.0)
        except forseti_celery.ForsetiTimeout:  # no leader yet
            return {}
        return found if set(WORKERS) <= set(found) else {}

    return timed(lambda: wait_for(metrics, 30.0, interval=0.1, message="the 3 workers did not all join"))


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwind through the finally blocks, like Ctrl-C


def main() -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    t0 = time.perf_counter()
    embedded: EmbeddedRedis | None = None
    cluster: Cluster | None = None
    log_dir = tempfile.mkdtemp(prefix="forseti-demo-")
    ok = False
    try:
        url, embedded = broker_url_from_env()
        app.conf.broker_url = url
        where = f" (embedded Redis, pid {embedded.pid})" if embedded is not None else ""
        print(f"forseti_celery demo: broker {maybe_sanitize_url(url)}{where}")
        cluster = start_cluster(url, log_dir)  # held before start(): a half-started cluster is stopped too
        _, ms = timed(cluster.start)
        say(f"{len(WORKERS)} workers ready in {ms:.0f} ms (logs in {log_dir})")
        for w in cluster.workers:
            say(f"  {w.hostname:<22} pid {w.pid}")
        metrics, ms = wait_for_workers()
        say(f"all joined the cluster {ms:.0f} ms later: get_metrics() -> {metrics}")

        tour = Tour(cluster)
        tour.get_key()
        tour.search_key()
        tour.call_and_send()
        tour.pollers()
        tour.placement()
        tour.errors()
        section("8. A FastAPI app: one async keyed process per user")
        web_demo.tour(say, expect)
        tour.stop_all()
        ok = True
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        if cluster is not None:
            print(f"\nworker logs (kept in {log_dir}):\n{cluster.log_tails(30)}", file=sys.stderr)
    finally:
        ok = shutdown(cluster, embedded) and ok
        if ok:
            shutil.rmtree(log_dir, ignore_errors=True)
    print(f"\n{'done' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1


def shutdown(cluster: Cluster | None, embedded: EmbeddedRedis | None) -> bool:
    """Stop the workers and the embedded Redis; False if a worker left a process behind."""
    section("10. Shutdown")
    # A second Ctrl-C must not cut the clean-up short: every step below has a deadline.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    clean = True
    try:
        forseti.client.close()  # before the broker goes away, or its thread complains
        if cluster is not None:
            orphans, ms = timed(cluster.stop)
            codes = _join(w.returncode for w in cluster.workers)
            say(f"workers stopped in {ms:.0f} ms (exit codes {codes}); "
                f"{'no process left behind' if not orphans else f'ORPHANS killed: {orphans}'}")
            clean = not orphans
    finally:
        if embedded is not None:
            embedded.stop()
            say("embedded Redis stopped")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return clean


def _join(items: Iterable[Any]) -> str:
    return ", ".join(str(i) for i in items)


if __name__ == "__main__":
    sys.exit(main())
