"""The async client (issue 14): ``aget_key``, ``acall`` … on real workers, both brokers.

One cluster of ``tests.app`` workers per broker serves the whole module. Requests that must
stay unanswered (the leak and thread tests) go to a ref on a worker that does not exist: the
broker drops them (no queue is bound to its routing key), so only the client's side is measured.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import forseti_celery
from forseti_celery import KeyRef
from forseti_celery.client.aio import AsyncPending, _LoopSide
from forseti_celery.client.routes import RouteTable

from .helpers import Harness, client_app, fresh, harness


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    url: str = request.getfixturevalue(f"{request.param}_url")
    with harness(url, tmp_path_factory.mktemp(f"aio-{request.param}"), n=2) as cluster:
        yield cluster


def nowhere(h: Harness, key: str = "k") -> KeyRef:
    """A ref to a worker that does not exist: what is sent to it is never answered."""
    return KeyRef("nobody@nowhere", 1, key, "default", h.namespace, h.app)


def async_waiters(h: Harness) -> int:
    return h.forseti.aio.waiting()


@pytest.mark.asyncio
async def test_each_async_function_gives_what_its_sync_twin_gives(h: Harness) -> None:
    app, key = h.app, fresh("same")
    ref = await forseti_celery.aget_key(key, args=(7,), app=app)
    assert ref == forseti_celery.get_key(key, args=(7,), app=app)
    assert await h.forseti.aget_key(key) == ref
    assert await forseti_celery.asearch_key(key, app=app) == forseti_celery.search_key(key, app=app) == ref
    assert await forseti_celery.asearch_key(fresh("absent"), app=app) is None
    assert await ref.acall("get", timeout=5) == ref.call("get") == 7
    assert await forseti_celery.aget_metrics(app=app) == forseti_celery.get_metrics(app=app)
    assert await forseti_celery.aget_less_used_node(app=app) == forseti_celery.get_less_used_node(app=app)
    await ref.asend("inc")
    assert await forseti_celery.acall(key, "get", app=app) == 8
    await forseti_celery.asend(key, "inc", app=app)
    assert await h.forseti.acall(key, "get") == forseti_celery.call(key, "get", app=app) == 9
    await ref.astop()
    assert await forseti_celery.asearch_key(key, app=app) is None
    assert async_waiters(h) == 0


@pytest.mark.asyncio
async def test_async_errors_are_the_sync_ones(h: Harness) -> None:
    app = h.app
    with pytest.raises(forseti_celery.InvalidKey):
        await forseti_celery.aget_key(123, app=app)  # type: ignore[arg-type]
    with pytest.raises(forseti_celery.UnknownName):
        await forseti_celery.aget_key(fresh("unknown"), name="no-such-name", app=app)
    ref = await forseti_celery.aget_key(fresh("errors"), app=app)
    with pytest.raises(forseti_celery.InvalidMessage):
        await ref.acall({"x": object()})
    with pytest.raises(forseti_celery.InvalidArgument):
        await forseti_celery.aget_key(fresh("bad"), app=app, timeout=-1)
    other = KeyRef(ref.node, ref.pid, ref.key, ref.name, "another-namespace", app)
    with pytest.raises(forseti_celery.InvalidArgument):
        await h.forseti.aio.call(other, "get", None)
    with pytest.raises(forseti_celery.RemoteError, match="asked to crash"):
        await ref.acall("crash")
    with pytest.raises((forseti_celery.ProcessGone, forseti_celery.RemoteError)):
        await ref.acall("get", timeout=5)
    assert async_waiters(h) == 0


@pytest.mark.asyncio
async def test_an_async_timeout_is_forseti_timeout_and_timeout_error(h: Harness) -> None:
    ref = await forseti_celery.aget_key(fresh("timeout"), app=h.app)
    with pytest.raises(forseti_celery.ForsetiTimeout) as caught:
        await ref.acall({"sleep": 1.0}, timeout=0.2)
    assert isinstance(caught.value, TimeoutError)
    # The caller's own deadline cancels the call; the process answers the next one.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ref.acall({"sleep": 1.0}), 0.2)
    assert await ref.acall("get", timeout=10) == 0
    assert async_waiters(h) == 0


@pytest.mark.asyncio
async def test_a_leader_request_nobody_answers_is_sent_again_then_times_out(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    app = client_app(h.app.conf.broker_url, f"forseti-nobody{os.getpid()}")
    app.conf.forseti_retry_interval = 0.2
    sent: list[str] = []
    send = _LoopSide.send
    monkeypatch.setattr(_LoopSide, "send", lambda side, rk, *rest: (sent.append(rk), send(side, rk, *rest)))
    try:
        with pytest.raises(forseti_celery.ForsetiTimeout, match="no leader answered"):
            await forseti_celery.aget_key("k", app=app, timeout=1)
        assert not forseti_celery.Forseti.of(app).client.pending
        assert len(sent) >= 3  # every forseti_retry_interval
    finally:
        forseti_celery.Forseti.of(app).close()


@pytest.mark.asyncio
async def test_an_idle_loops_request_goes_at_once_and_the_others_of_its_iteration_in_one_flush(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first request of a loop with none awaiting is published in the task's own step (issue
    # 15, row 17c: a loop iteration less); those of the same iteration after it are grouped.
    published: list[list[int]] = []
    publish_many = _LoopSide._publish_many
    monkeypatch.setattr(_LoopSide, "_publish_many", lambda side, batches: (
        published.append([len(msgs) for _, msgs in batches]), publish_many(side, batches))[1])
    ref = nowhere(h, fresh("idle"))
    tasks = [asyncio.ensure_future(ref.acall(i, timeout=30)) for i in range(3)]
    await asyncio.sleep(0)  # the three tasks' first steps ran, then this one: no flush callback yet
    assert published == [[1]]
    await asyncio.sleep(0)  # the flush of the other two, one broker message
    assert published == [[1], [2]]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert async_waiters(h) == 0


@pytest.mark.asyncio
async def test_a_request_whose_publish_fails_at_once_raises_broker_unavailable_not_a_timeout(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(side: _LoopSide, batches: Any) -> None:
        raise forseti_celery.BrokerUnavailable("the broker went away (test)")

    ref = await forseti_celery.aget_key(fresh("refused"), app=h.app)  # the client started
    monkeypatch.setattr(_LoopSide, "_publish_many", refuse)
    with pytest.raises(forseti_celery.BrokerUnavailable, match="went away"):
        # At once: without the check it was raised only once the call's 60 s had run out.
        await asyncio.wait_for(ref.acall("get", timeout=60), 20)
    monkeypatch.undo()
    assert await ref.acall("get", timeout=10) == 0
    assert async_waiters(h) == 0 and not h.forseti.client.pending


@pytest.mark.asyncio
async def test_100k_cancelled_calls_leave_no_waiter_and_bounded_memory(h: Harness) -> None:
    ref = nowhere(h)

    async def cancelled(n: int) -> None:
        tasks = [asyncio.ensure_future(ref.acall("x", timeout=60)) for _ in range(n)]
        await asyncio.sleep(0)  # each holds its request and awaits its answer
        await asyncio.sleep(0)  # the requests are published
        assert async_waiters(h) == n
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)

    await cancelled(10_000)  # warm: the allocator's arenas, the broker connection
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(10):
        await cancelled(10_000)
    await asyncio.sleep(0)  # the done tasks' callbacks, which hold them, have run
    gc.collect()
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert async_waiters(h) == 0 and not h.forseti.client.pending
    assert not [o for o in gc.get_objects() if isinstance(o, AsyncPending)]
    assert grown_kb < 20_000, f"peak RSS grew {grown_kb} kB over 100k cancelled calls"
    # Still serving, the answers of real calls reach their tasks.
    real = await forseti_celery.aget_key(fresh("after"), app=h.app)
    assert await asyncio.gather(*[real.acall("get") for _ in range(100)]) == [0] * 100


@pytest.mark.asyncio
async def test_cancelled_key_addressed_calls_free_their_route_and_keep_later_messages_in_order(h: Harness) -> None:
    key = fresh("order")
    await forseti_celery.aget_key(key, app=h.app)
    for i in range(60):
        await forseti_celery.asend(key, i, app=h.app)
        if i % 5 == 0:
            call = asyncio.ensure_future(forseti_celery.acall(key, {"sleep": 0.01}, app=h.app))
            await asyncio.sleep(0)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
    assert await forseti_celery.acall(key, "seen", app=h.app) == list(range(60))
    route = h.forseti.client._routes.get("default", key)
    assert route is not None and route.calls == 0
    assert async_waiters(h) == 0


def test_a_call_given_up_unanswered_keeps_its_route_on_an_exit_as_a_send_does() -> None:
    routes = RouteTable()
    ref = KeyRef("a", 1, "k", "n")
    routes.open(ref)
    taken = routes.take("n", "k", cast=False)
    assert taken is not None
    routes.answered(taken[0], settled=False)  # cancelled: the call may still reach the old worker
    routes.exited("n", "k", "a", 1)
    assert routes.get("n", "k") is taken[0]  # the next message waits for a notice (or the linger)
    routes.open(KeyRef("a", 2, "k2", "n"))
    taken = routes.take("n", "k2", cast=False)
    assert taken is not None
    routes.answered(taken[0])  # answered: nothing of it is on its way
    routes.exited("n", "k2", "a", 2)
    assert routes.get("n", "k2") is None


@pytest.mark.asyncio
async def test_ten_thousand_calls_in_flight_use_no_more_threads_than_one_sync_call(h: Harness) -> None:
    h.forseti.close()  # a fresh client: what one sync call starts, and nothing else
    ref = await asyncio.to_thread(forseti_celery.get_key, fresh("threads"), app=h.app)
    await asyncio.to_thread(ref.call, "get")
    baseline = set(threading.enumerate())
    lost = nowhere(h)
    tasks = [asyncio.ensure_future(lost.acall("x", timeout=60)) for _ in range(10_000)]
    real = asyncio.gather(*[ref.acall("get") for _ in range(1_000)])
    assert await real == [0] * 1_000
    assert async_waiters(h) == 10_000
    assert set(threading.enumerate()) <= baseline
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert async_waiters(h) == 0


def test_several_loops_in_threads_and_sync_callers_share_the_client(h: Harness) -> None:
    refs = [forseti_celery.get_key(fresh(f"loops{i}"), args=(i,), app=h.app) for i in range(4)]
    results: dict[int, Any] = {}

    async def loop_body(i: int) -> list[Any]:
        answers = await asyncio.gather(*[refs[i].acall("get") for _ in range(200)])
        return [*answers, await forseti_celery.acall(refs[i].key, "key", app=h.app)]

    def in_thread(i: int) -> None:
        results[i] = asyncio.run(loop_body(i)) if i < 4 else [refs[0].call("get") for _ in range(50)]

    threads = [threading.Thread(target=in_thread, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(4):
        assert results[i] == [i] * 200 + [refs[i].key]
    assert results[4] == [0] * 50
    assert async_waiters(h) == 0


def test_a_forked_child_awaits_with_a_fresh_client_of_its_own(h: Harness) -> None:
    ref = forseti_celery.get_key(fresh("fork"), args=(5,), app=h.app)
    assert asyncio.run(ref.acall("get")) == 5  # the parent's client, used from a loop, then fork
    parent_client = h.forseti.client.id
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            answer = asyncio.run(forseti_celery.acall(ref.key, "get", app=h.app, timeout=20))
            out = {"answer": answer, "client": h.forseti.client.id, "ref": asyncio.run(ref.acall("key"))}
        except BaseException as exc:
            out = {"error": repr(exc)}
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out = json.loads(f.read() or "{}")
    os.waitpid(pid, 0)
    assert out == {"answer": 5, "client": out.get("client"), "ref": ref.key}, out
    assert out["client"] != parent_client
    assert asyncio.run(ref.acall("get")) == 5  # and the parent's still serves



def test_an_unreachable_broker_is_broker_unavailable_to_both_apis() -> None:
    app = client_app("redis://127.0.0.1:1/0", f"forseti-unreachable{os.getpid()}")  # nothing listens there
    try:
        with pytest.raises(forseti_celery.BrokerUnavailable):
            forseti_celery.get_key("k", app=app, timeout=5)
        with pytest.raises(forseti_celery.BrokerUnavailable):
            asyncio.run(forseti_celery.aget_key("k", app=app, timeout=5))
        with pytest.raises(forseti_celery.BrokerUnavailable):
            asyncio.run(forseti_celery.acall("k", "get", app=app, timeout=5))
    finally:
        forseti_celery.Forseti.of(app).close()
