"""Contracts with the library internals forseti_celery.core.compat uses, and its fallbacks.

Each contract test fails when kombu, billiard, redis-py or CPython stops behaving as a guarded
use relies on: then the use (and its guard's version range) needs looking at, before a user
meets the difference. The fallback tests force a guard off and check the plain path keeps the
same guarantees, on real Redis.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import billiard
import billiard.popen_fork
import pytest
import redis
import redis.exceptions
from celery import Celery
from kombu import Connection, Exchange, Producer, Queue

from forseti_celery.core import compat
from forseti_celery.core.broker import Publisher, RestartIntensity
from forseti_celery.core.consumer import ConsumerLoop
from forseti_celery.core.transport import redis_wire
from forseti_celery.testing import wait_for
from forseti_celery.worker.pool.fork import KeyedChild


def _queue(tag: str, expires_ms: int | None = None) -> Queue:
    name = f"forseti-t-{tag}"
    return Queue(name, Exchange(""), routing_key=name, auto_delete=True,
                 queue_arguments=None if expires_ms is None else {"x-expires": expires_ms})


def test_every_guard_accepts_the_installed_libraries() -> None:
    # A library upgraded past a guard's range would silently take the slow path everywhere: the
    # range is widened here, after the contracts below pass on the new version.
    for guard in compat.GUARDS:
        assert guard._check() is None, f"{guard.name}: {guard._check()}"


def test_a_failed_check_is_logged_once_and_keeps_the_plain_path(caplog: pytest.LogCaptureFixture) -> None:
    checks: list[int] = []
    guard = compat.Guard("some internal", "taking the plain path", lambda: checks.append(1) or "kombu 9.0 is newer")
    with caplog.at_level("WARNING", logger="forseti_celery.core.compat"):
        assert not guard.ok() and not guard.ok()
    assert checks == [1]
    warnings = [r.getMessage() for r in caplog.records if r.name == "forseti_celery.core.compat"]
    assert warnings == ["forseti: some internal: kombu 9.0 is newer; taking the plain path"]


# -- kombu's Redis channel ---------------------------------------------------------------------

def test_kombus_redis_channel_publishes_through_conn_or_acquire(redis_url: str) -> None:
    with Connection(redis_url) as conn:
        channel = conn.default_channel
        original, calls = channel.conn_or_acquire, []

        @contextmanager
        def recording(client: Any = None) -> Iterator[Any]:
            calls.append(client)
            with original(client) as c:
                yield c

        channel.conn_or_acquire = recording
        queue = _queue(uuid.uuid4().hex[:8])
        queue(channel).declare()
        calls.clear()
        Producer(channel).publish(b"x", routing_key=queue.routing_key, exchange=queue.exchange)
        assert calls, "kombu published without conn_or_acquire: reuse_redis_client no longer applies"
        assert channel.client.llen(queue.name) == 1
        queue(channel).delete()


def test_kombus_put_opens_a_pipeline_of_its_own_for_a_queue_with_an_expiry(redis_url: str) -> None:
    # What redis_publish_pipeline joins to its own pipeline: were kombu to stop (or to start doing
    # it for every queue), the joined pipeline would be dead code (or in every publish's path).
    with Connection(redis_url) as conn:
        channel = conn.default_channel
        opened: list[bool] = []
        client = channel._create_client()
        real_pipeline = client.pipeline

        def pipeline(*args: Any, **kwargs: Any) -> Any:
            opened.append(True)
            return real_pipeline(*args, **kwargs)

        client.pipeline = pipeline

        @contextmanager
        def ours(c: Any = None) -> Iterator[Any]:
            yield c or client

        channel.conn_or_acquire = ours
        tag = uuid.uuid4().hex[:8]
        plain, expiring = _queue(tag + "-p"), _queue(tag + "-e", expires_ms=60_000)
        for q in (plain, expiring):
            q(channel).declare()
        opened.clear()
        Producer(channel).publish(b"x", routing_key=plain.routing_key, exchange=plain.exchange)
        assert not opened
        Producer(channel).publish(b"x", routing_key=expiring.routing_key, exchange=expiring.exchange)
        assert opened, "kombu's _put no longer opens a pipeline for a queue with an expiry"
        for q in (plain, expiring):
            q(channel).delete()


@pytest.mark.parametrize("guarded", [True, False], ids=["pipeline", "fallback"])
def test_publish_many_reaches_redis_in_its_order_when_a_queue_has_an_expiry(redis_url: str, guarded: bool) -> None:
    # kombu's _put sends a message to a queue with x-expires through a pipeline it opens itself:
    # opened from publish_many's pipeline, it ran at once, ahead of what the batch held before it.
    tag = uuid.uuid4().hex[:8]
    plain, expiring = _queue(tag + "-p"), _queue(tag + "-e", expires_ms=60_000)
    app = Celery("compat-test", broker=redis_url, set_as_current=False)
    with compat.KOMBU_REDIS_PUBLISH.forced(guarded), redis_wire.KOMBU_REDIS_WIRE.forced(False):  # kombu's publish
        publisher = Publisher(app.connection_for_write())
        monitor = redis.Redis.from_url(redis_url, socket_timeout=5).monitor()
        try:
            for q in (plain, expiring):
                publisher.declare(q)
            monitor.__enter__()  # MONITOR answered: every later command is seen, in the server's order
            exchange = Exchange("")
            publisher.publish_many(exchange, [(plain.routing_key, [{"t": "x", "i": 1}]),
                                              (expiring.routing_key, [{"t": "x", "i": 2}]),
                                              (plain.routing_key, [{"t": "x", "i": 3}])])
            pushed: list[str] = []
            while len(pushed) < 3:
                command = monitor.next_command()["command"]
                if command.startswith("LPUSH") and tag in command:
                    pushed.append(command.split()[1])
            assert pushed == [plain.name, expiring.name, plain.name]
            assert (getattr(publisher._ready().channel, "_forseti_client", None) is not None) is guarded
        finally:
            monitor.__exit__()
            with redis.Redis.from_url(redis_url) as r:
                r.delete(plain.name, expiring.name)
            publisher.close()


def test_publish_many_through_kombus_own_path_delivers_every_batch_in_order_and_keeps_lists(redis_url: str) -> None:
    # The fallback when kombu's internals are not the ones known: slower, the same guarantees
    # (order, delivery, and a list raised to its TTL after each push).
    app = Celery("compat-test", broker=redis_url, set_as_current=False)
    tag = uuid.uuid4().hex[:8]
    exchange = Exchange("")
    queues = [_queue(f"{tag}-{n}") for n in ("a", "b")]
    a, b = (q.routing_key for q in queues)
    received: dict[str, list[object]] = {"a": [], "b": []}
    loop = ConsumerLoop("test-loop", app.connection_for_read, lambda: queues,
                        lambda batch: received[str(batch[0]["q"])].append([m["i"] for m in batch]),
                        intensity=RestartIntensity(3, 10), interval=0.05)
    with compat.KOMBU_REDIS_PUBLISH.forced(False), redis_wire.KOMBU_REDIS_WIRE.forced(False):
        publisher = Publisher(app.connection_for_write(), keep=lambda rk: 30.0 if rk == b else None)
        loop.start()
        try:
            assert loop.connected.wait(10)
            publisher.publish_many(exchange, [(a, [{"t": "x", "q": "a", "i": i} for i in range(3)]),
                                              (b, [{"t": "x", "q": "b", "i": 3}])]
                                   + [(rk, [{"t": "x", "q": q, "i": i}]) for i in range(4, 200)
                                      for rk, q in ((a, "a"), (b, "b"))])
            with redis.Redis.from_url(redis_url) as r:
                ttl = r.pttl(b)
            wait_for(lambda: len(received["a"]) + len(received["b"]) == 2 + 2 * 196, 20, 0.02,
                     lambda: f"received {received}")
            assert received["a"] == [[0, 1, 2], *[[i] for i in range(4, 200)]]
            assert received["b"] == [[3], *[[i] for i in range(4, 200)]]
            assert ttl == -2 or ttl > 20_000, "the kept list got no TTL"  # -2: already drained
            assert getattr(publisher._ready().channel, "_forseti_client", None) is None
        finally:
            loop.stop()
            publisher.close()


# -- redis-py's Lock ----------------------------------------------------------------------------

@pytest.mark.parametrize("guarded", [True, False], ids=["token", "fallback"])
def test_a_redis_lock_is_held_until_its_key_is_lost_then_forgotten(redis_url: str, guarded: bool) -> None:
    client = redis.Redis.from_url(redis_url)
    key = f"forseti-t-lock-{uuid.uuid4().hex[:8]}"
    with compat.REDIS_LOCK_TOKEN.forced(guarded):
        lock = client.lock(key, timeout=5, blocking=False, thread_local=False)
        assert not compat.redis_lock_held(lock)
        assert lock.acquire(blocking=False)
        assert compat.redis_lock_held(lock)
        assert not client.lock(key, timeout=5, blocking=False).acquire(blocking=False)
        lock.extend(5, replace_ttl=True)
        client.delete(key)  # the lease ran out, or another worker took it after
        with pytest.raises(redis.exceptions.LockError):
            lock.extend(5, replace_ttl=True)
        compat.redis_lock_forget(lock)
        assert not compat.redis_lock_held(lock)
        assert lock.acquire(blocking=False)  # the next poll acquires anew
        lock.release()
    client.close()


def test_a_redis_lock_token_is_the_one_attribute_that_says_it_is_held(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    lock = client.lock(f"forseti-t-lock-{uuid.uuid4().hex[:8]}", timeout=5, blocking=False, thread_local=False)
    assert lock.local.token is None
    assert lock.acquire(blocking=False)
    assert lock.local.token is not None
    seen: list[object] = []
    threading.Thread(target=lambda: seen.append(lock.local.token)).start()  # thread_local=False: one token
    wait_for(lambda: seen, 5, 0.01, "thread did not run")
    assert seen == [lock.local.token]
    lock.release()
    assert lock.local.token is None
    client.close()


# -- billiard ----------------------------------------------------------------------------------

def _report(w: int) -> None:
    me = billiard.current_process()
    os.write(w, f"{me.name} {len(billiard.active_children())}".encode())


@pytest.mark.parametrize("guarded", [True, False], ids=["skip-hooks", "fallback"])
def test_a_keyed_child_is_the_current_billiard_process_with_no_children_and_its_exit_code(guarded: bool) -> None:
    assert "_bootstrap" in vars(billiard.process.BaseProcess)
    assert "_launch" in vars(billiard.popen_fork.Popen)
    assert "_bootstrap" in inspect.getsource(billiard.popen_fork.Popen._launch)
    r, w = os.pipe()
    sibling = billiard.Process(target=time.sleep, args=(30,))  # a child the parent has, not the new one
    with compat.BILLIARD_BOOTSTRAP.forced(guarded):
        sibling.start()
        child = KeyedChild(target=_report, args=(w,), name=f"compat-{guarded}")
        child.start()
        child.join(10)
        failing = KeyedChild(target=sys.exit, args=(3,))
        failing.start()
        failing.join(10)
    os.close(w)
    try:
        assert child.exitcode == 0 and failing.exitcode == 3
        assert os.read(r, 100).decode() == f"compat-{guarded} 0"
    finally:
        sibling.terminate()
        sibling.join(5)
        os.close(r)


# -- CPython's threading -----------------------------------------------------------------------

def test_the_thread_objects_a_fork_resets_include_dangling_ones_which_compat_forgets() -> None:
    assert "_dangling" in inspect.getsource(threading._after_fork)  # type: ignore[attr-defined]
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    assert t in threading._dangling  # type: ignore[attr-defined]
    saved = set(threading._dangling)  # type: ignore[attr-defined]
    compat.forget_dead_threads()
    try:
        assert t not in threading._dangling  # type: ignore[attr-defined]
    finally:
        threading._dangling.update(saved)  # type: ignore[attr-defined]
