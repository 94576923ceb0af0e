"""Key-addressed messages (issue 12): ``forseti_celery.call/send`` on real workers, and the
client's route table (pure logic).

The keyed processes (``tests/keyed_app.py``) record what each incarnation handled in Redis,
so a test can tell which messages every incarnation of a key took, and in which order.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

import forseti_celery
from forseti_celery import (
    Forseti,
    InvalidArgument,
    InvalidKey,
    InvalidMessage,
    KeyRef,
    RemoteError,
    StartError,
    UnknownName,
)
from forseti_celery.client.routes import Route, RouteTable
from forseti_celery.testing import Cluster, WaitTimeout, short_hostname, wait_for

from .helpers import ROOT, client_app, fresh
from .keyed_app import record_key


class KeyedCluster:
    """Workers of ``tests.keyed_app`` (a namespace of their own), a client, and the records."""

    def __init__(self, broker_url: str, record_url: str, tmp: Path, n: int = 2, **env: str) -> None:
        self.namespace = f"forseti-ka{uuid.uuid4().hex[:8]}"
        tag = self.namespace[-4:]
        self.record_url = record_url
        self.cluster = Cluster(
            "tests.keyed_app", n, broker_url=broker_url, log_dir=tmp / "logs", cwd=str(ROOT),
            env={"FORSETI_NAMESPACE": self.namespace, "KA_RECORD_URL": record_url, **env},
            hostnames=[f"k{i}-{tag}@{short_hostname()}" for i in range(1, n + 1)])
        self.app = client_app(broker_url, self.namespace)
        self.forseti = Forseti.of(self.app)
        self.db = redis.Redis.from_url(record_url, decode_responses=True)

    def start(self) -> KeyedCluster:
        self.cluster.start()
        n = len(self.cluster.workers)

        def ready() -> bool:
            try:
                return len(self.forseti.get_metrics(timeout=2)) == n
            except Exception:
                return False
        wait_for(ready, 30, 0.1, lambda: f"cluster never listed {n} workers\n{self.cluster.log_tails()}")
        return self

    def log(self, key: str) -> list[Any]:
        """Every message the key's processes handled, in the order they handled them."""
        return [json.loads(m) for m in self.db.lrange(record_key("log", key, self.namespace), 0, -1)]

    def incarnations(self, key: str) -> int:
        return int(self.db.get(record_key("inc", key, self.namespace)) or 0)

    def ends(self, key: str) -> list[str]:
        return [str(r) for r in self.db.lrange(record_key("end", key, self.namespace), 0, -1)]

    def stop(self) -> list[int]:
        self.forseti.close()
        self.db.close()
        return self.cluster.stop()


def key_off_the_leader(c: KeyedCluster, prefix: str) -> tuple[str, str]:
    """A new key of ``"ka"`` whose process runs on a worker that does not lead, and that worker.

    The leader's warm shutdown hands its role over first, and a new leader makes every client
    drop its routes, which may reorder what a route still had waiting at the old worker (the
    documented price, ``docs/lifecycle.rst``): a test of the hand-off alone leaves the leader be."""
    stats = c.app.control.inspect(destination=[w.hostname for w in c.cluster.workers], timeout=5).stats() or {}
    leaders = [h for h, s in stats.items() if s.get("forseti", {}).get("leader")]
    assert len(leaders) == 1, f"not one leader: {stats}"
    for _ in range(len(c.cluster.workers) + 1):  # a new key goes to the least-used worker
        key = fresh(prefix)
        c.forseti.call(key, -1, name="ka")
        node = c.forseti.get_key(key, name="ka").node
        if node != leaders[0]:
            return key, node
    raise AssertionError(f"every key went to the leader {leaders[0]}")


@contextmanager
def keyed_cluster(broker_url: str, record_url: str, tmp: Path, **kw: Any) -> Iterator[KeyedCluster]:
    c = KeyedCluster(broker_url, record_url, tmp, **kw)
    try:
        yield c.start()
    finally:
        orphans = c.stop()
        assert not orphans, f"orphan processes left: {orphans}"


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def kc(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedCluster]:
    """One cluster per broker for this module's tests (each uses keys of its own)."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    record: str = request.getfixturevalue("redis_url")
    with keyed_cluster(url, record, tmp_path_factory.mktemp(request.param)) as c:
        yield c


# -- on real workers ------------------------------------------------------------------------------
def test_a_key_addressed_call_creates_the_process_with_its_args_then_uses_the_cached_ref(kc: KeyedCluster) -> None:
    key = fresh("create")
    # The client caches what the leader answers once its exits subscription is live (before that a
    # process could end unheard), which a new client's first requests may overtake: wait for it.
    client = kc.forseti.client
    client.ensure_started()
    assert client._loop.connected.wait(10), "the client's reply thread never subscribed"
    first = forseti_celery.call(key, {"op": "get"}, name="ka", args=(42,), timeout=10, app=kc.app)
    assert first["args"] == [42] and first["incarnation"] == 1
    ref = kc.forseti.client._cache.get("ka", key)
    assert ref is not None and ref.pid == first["pid"]
    # Later messages go to the same process; args of later messages do not start another.
    forseti_celery.send(key, {"op": "touch"}, name="ka", args=(7,), app=kc.app)
    again = kc.forseti.call(key, {"op": "get"}, name="ka", args=(7,))
    assert again == first
    assert kc.log(key) == [{"op": "get"}, {"op": "touch"}, {"op": "get"}]
    assert kc.forseti.get_key(key, name="ka") == ref == kc.forseti.search_key(key, name="ka")
    ref.stop()


def test_key_addressed_sends_and_calls_are_handled_in_the_order_one_client_sent_them(kc: KeyedCluster) -> None:
    key = fresh("order")
    for i in range(300):
        if i % 50 == 49:
            kc.forseti.call(key, i, name="ka")
        else:
            kc.forseti.send(key, i, name="ka")
    kc.forseti.call(key, "last", name="ka")
    assert kc.log(key) == [*range(300), "last"]
    assert kc.incarnations(key) == 1
    kc.forseti.get_key(key, name="ka").stop()


def test_messages_to_a_passivated_key_reach_its_next_incarnation_in_order_and_the_route_follows(
    kc: KeyedCluster,
) -> None:
    key = fresh("passivated")
    for i in range(5):
        kc.forseti.send(key, i, name="ka_idle", args=("a",))
    old = kc.forseti.call(key, "first", name="ka_idle", args=("a",))
    wait_for(lambda: kc.ends(key) == ["idle"], 15, 0.05, lambda: f"never passivated: {kc.ends(key)}")
    # The route still leads to the passivated process (sends went along it): its worker holds
    # these, starts the key again and forwards them, in order, before the call.
    for i in range(5, 10):
        kc.forseti.send(key, i, name="ka_idle", args=("b",))
    new = kc.forseti.call(key, "second", name="ka_idle", args=("b",), timeout=10)
    assert new["incarnation"] == 2 and new["pid"] != old["pid"]
    assert new["args"] == ["b"]  # created on demand with the args the messages carried
    assert kc.log(key) == [*range(5), "first", *range(5, 10), "second"]
    # The moved notice covering all it sent switches the route to the new incarnation.
    routes = kc.forseti.client._routes
    wait_for(lambda: routes.get("ka_idle", key).ref.pid == new["pid"], 10, 0.05,  # type: ignore[union-attr]
             "the route never moved to the new incarnation")
    assert kc.forseti.call(key, "third", name="ka_idle")["pid"] == new["pid"]
    assert kc.log(key)[-1] == "third" and kc.incarnations(key) == 2


def test_a_passivated_key_whose_route_had_only_answered_calls_is_created_again_by_the_next_call(
    kc: KeyedCluster,
) -> None:
    key = fresh("calls-only")
    old = kc.forseti.call(key, 1, name="ka_idle")
    wait_for(lambda: kc.ends(key) == ["idle"], 15, 0.05, lambda: f"never passivated: {kc.ends(key)}")
    # Nothing outstanding on the route: the exit event dropped it with the cached ref.
    wait_for(lambda: kc.forseti.client._routes.get("ka_idle", key) is None, 10, 0.05, "the route stayed")
    new = kc.forseti.call(key, 2, name="ka_idle")
    assert new["incarnation"] == 2 and new["pid"] != old["pid"]
    assert kc.log(key) == [1, 2]



def _send_while_leaving(c: KeyedCluster, key: str, leaving: threading.Thread) -> int:
    """Start ``leaving`` (a worker's warm shutdown) and send ``key`` 0, 1, ... every 10 ms while it
    runs, for 3 s at least; how many were sent."""
    leaving.start()
    sent = 0
    t0 = time.monotonic()
    while leaving.is_alive() or time.monotonic() - t0 < 3:
        c.forseti.send(key, sent, name="ka")
        sent += 1
        time.sleep(0.01)
    leaving.join()
    return sent

def test_sends_while_their_worker_shuts_down_reach_the_next_incarnation_all_of_them_in_order(
    broker_url: str, redis_url: str, tmp_path: Path
) -> None:
    with keyed_cluster(broker_url, redis_url, tmp_path, n=2) as c:
        key, node = key_off_the_leader(c, "left")
        leaving = threading.Thread(target=c.cluster.worker(node).stop)  # a warm shutdown
        sent = _send_while_leaving(c, key, leaving)
        last = c.forseti.call(key, "last", name="ka", timeout=10)
        assert last["incarnation"] == 2 and c.forseti.get_key(key, name="ka").node != node
        assert c.log(key) == [-1, *range(sent), "last"]
        assert c.ends(key) == ["shutdown"]


def test_a_sender_stalled_behind_a_notice_that_does_not_cover_it_loses_nothing_to_its_worker_leaving(
    broker_url: str, redis_url: str, tmp_path: Path
) -> None:
    # A client streaming sends to a key whose worker shuts down stalls as it reads the first
    # ``moved`` notice: nothing it sends reaches the broker until the old worker has left (or for
    # 3 s, well within its grace of 10 s), and it sends one more message meanwhile, which no notice
    # can cover. The worker, which hears nothing from it meanwhile, must not take the silence for
    # the client having moved: it waits for the client's ``followed``.
    with keyed_cluster(broker_url, redis_url, tmp_path, n=2, KA_STOP_TIMEOUT="10") as c:
        key, node = key_off_the_leader(c, "stalled")
        leaving = threading.Thread(target=c.cluster.worker(node).stop)  # a warm shutdown
        client = c.forseti.client
        notice_of = client._moved
        stalled = threading.Event()

        def stall() -> None:
            with client._sender._lock:  # the sender thread publishes nothing while this is held
                stalled.set()
                try:  # until the client hears that the worker left (it has said bye), for 3 s at most
                    wait_for(lambda: (r := client._routes.get("ka", key)) is None or r.ref.node != node, 3, 0.01)
                except WaitTimeout:
                    return  # it waits for this client, still consuming: what was stalled reaches it
                leaving.join()  # it reads its queue no more

        def moved(notice: dict[str, Any]) -> None:
            if not stalled.is_set():
                threading.Thread(target=stall).start()
                stalled.wait()
                route = client._routes.get("ka", key)
                assert route is not None
                published = route.last  # what the client sent before (maybe on its way to the worker)
                wait_for(lambda: route.last > published, 10, 0.005, "the client sent nothing more")
            notice_of(notice)  # no notice covers what is stalled: the route stays, until the worker left

        client._moved = moved  # type: ignore[method-assign]
        sent = _send_while_leaving(c, key, leaving)
        assert stalled.is_set(), "no moved notice came"
        last = c.forseti.call(key, "last", name="ka", timeout=10)
        assert last["incarnation"] == 2 and c.forseti.get_key(key, name="ka").node != node
        assert c.log(key) == [-1, *range(sent), "last"]


def test_a_key_addressed_call_that_crashed_its_process_raises_remote_error_and_is_not_replayed(
    kc: KeyedCluster,
) -> None:
    key = fresh("crash")
    first = kc.forseti.call(key, "before", name="ka")
    with pytest.raises(RemoteError, match="asked to crash"):
        kc.forseti.call(key, "crash", name="ka")
    after = kc.forseti.call(key, "after", name="ka", timeout=10)
    assert after["pid"] != first["pid"] and after["incarnation"] == 2  # the crash was not replayed there
    assert kc.log(key) == ["before", "after"]
    kc.forseti.get_key(key, name="ka").stop()


def test_key_addressed_errors_are_those_of_the_sync_api(kc: KeyedCluster) -> None:
    with pytest.raises(StartError, match="asked to fail"):
        kc.forseti.call(fresh("fail"), "x", name="ka", args=("fail",))
    with pytest.raises(StartError, match="asked to fail"):
        kc.forseti.send(fresh("fail"), "x", name="ka", args=("fail",))
    with pytest.raises(UnknownName):
        kc.forseti.call(fresh("unknown"), "x", name="no-such-name", timeout=5)
    # Refused before anything is sent (no process is created for these).
    key = fresh("bad")
    with pytest.raises(InvalidKey):
        kc.forseti.call(42, "x", name="ka")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        kc.forseti.send(key, "x", name="")
    with pytest.raises(InvalidMessage):
        kc.forseti.send(key, "x", name="ka", args=(object(),))
    with pytest.raises(InvalidMessage):
        kc.forseti.call(key, {1j}, name="ka")
    with pytest.raises(InvalidArgument):
        kc.forseti.call(key, "x", name="ka", timeout=-1)
    assert kc.log(key) == []  # the message was never sent


# -- the route table (pure logic) ----------------------------------------------------------------
def _ref(node: str, pid: int, key: str = "k") -> KeyRef:
    return KeyRef(node, pid, key, "n", "ns")


def _open(routes: RouteTable, ref: KeyRef, cast: bool) -> tuple[Route, int]:
    """Open a route to ``ref`` and take it for one message."""
    routes.open(ref)
    taken = routes.take(ref.name, ref.key, cast)
    assert taken is not None
    return taken


def test_a_route_moves_only_on_a_notice_from_its_own_worker_that_covers_what_was_sent_on_it() -> None:
    routes = RouteTable()
    route, first = _open(routes, _ref("a", 1), cast=True)
    routes.open(_ref("b", 2))  # another thread's resolution loses to the open route
    taken = routes.take("n", "k", cast=True)
    assert taken is not None and taken[0] is route
    last = taken[1]
    assert last > first
    assert not routes.moved("n", "k", "a", 1, _ref("b", 2), last - 1)  # one still on its way to a
    assert not routes.moved("n", "k", "c", 9, _ref("b", 2), last)  # not this route's process
    assert routes.get("n", "k") is route
    assert routes.moved("n", "k", "a", 1, _ref("b", 2), last)
    moved = routes.get("n", "k")
    assert moved is not None and moved.ref == _ref("b", 2) and moved.last == last and not moved.casts
    assert not routes.moved("n", "k", "a", 1, _ref("c", 3), last)  # a late notice of the old route


def test_an_exit_drops_a_route_only_when_nothing_sent_on_it_is_outstanding() -> None:
    routes = RouteTable()
    assert routes.take("n", "k", cast=False) is None
    route, _ = _open(routes, _ref("a", 1), cast=False)
    routes.exited("n", "k", "a", 1)
    assert routes.get("n", "k") is route  # a call still waits for its answer
    routes.answered(route)
    routes.exited("n", "k", "a", 2)
    assert routes.get("n", "k") is route  # another process's exit
    routes.exited("n", "k", "a", 1)
    assert routes.get("n", "k") is None
    route, _ = _open(routes, _ref("a", 3), cast=True)
    routes.exited("n", "k", "a", 3)
    assert routes.get("n", "k") is route  # a send may wait at the old worker: its notice moves it
    routes.node_lost("b")
    assert routes.get("n", "k") is route
    routes.node_lost("a")
    assert routes.get("n", "k") is None


def test_a_crash_answered_to_a_call_ends_its_route_unless_a_send_may_wait_on_it() -> None:
    routes = RouteTable()
    route, _ = _open(routes, _ref("a", 1), cast=False)
    routes.answered(route, ended=True)
    assert routes.get("n", "k") is None
    route, _ = _open(routes, _ref("a", 2), cast=True)
    assert routes.take("n", "k", cast=False) is not None
    routes.answered(route, ended=True)
    assert routes.get("n", "k") is route


def test_a_route_whose_process_ended_with_sends_on_it_goes_once_unused_for_the_linger() -> None:
    routes = RouteTable(linger=0.2)
    route, _ = _open(routes, _ref("a", 1), cast=True)
    routes.exited("n", "k", "a", 1)
    assert routes.get("n", "k") is route  # a send may still wait at the old worker
    other, _ = _open(routes, _ref("a", 2, key="other"), cast=True)
    time.sleep(0.25)
    routes.exited("n", "other", "b", 9)  # any exit event sweeps
    assert routes.get("n", "k") is None
    assert routes.get("n", "other") is other  # its process has not ended
