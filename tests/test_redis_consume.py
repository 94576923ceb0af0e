"""Redis's reads without kombu's event loop (issue 15, ``core/transport/redis_consume``), on a real
Redis: what a ``ConsumerLoop`` promises holds on it as on kombu's own path (the guard forced off),
which every test also runs: order per list, fairness between lists, kombu's priority sub-lists,
fanouts, queues added and cancelled at runtime, a prompt stop, a reconnection that loses nothing
pushed meanwhile, a malformed message skipped.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection, Exchange, Producer, Queue

from forseti_celery.core.broker import Publisher, RestartIntensity
from forseti_celery.core.codec import CONTENT_ENCODING, CONTENT_TYPE, encode
from forseti_celery.core.consumer import ConsumerLoop
from forseti_celery.core.names import Names
from forseti_celery.core.transport import redis_consume
from forseti_celery.testing import wait_for

GUARD = redis_consume.KOMBU_REDIS_CONSUME
both = pytest.mark.parametrize("fast", [True, False], ids=["fast path", "kombu's path"])


def _app(url: str, **options: Any) -> Celery:
    app = Celery("consume-test", broker=url, set_as_current=False)
    app.conf.broker_transport_options = options
    return app


def _list(tag: str) -> Queue:
    name = f"forseti-t-{uuid.uuid4().hex[:8]}-{tag}"
    return Queue(name, Exchange(""), routing_key=name, auto_delete=True)


class Loop:
    """A ``ConsumerLoop`` of ``queues`` recording what it handles (and its disconnections)."""

    def __init__(self, app: Celery, queues: list[Queue], fast: bool, interval: float = 0.05,
                 on_batch: Callable[[Loop, list[Any]], None] | None = None) -> None:
        self.received: list[Any] = []
        self.disconnects = 0
        self._lock = threading.Lock()
        self._on_batch = on_batch
        self._fast = fast
        self.loop = ConsumerLoop("test-consume", app.connection_for_read, lambda: queues, self._handle,
                                 intensity=RestartIntensity(10, 30), interval=interval,
                                 on_disconnect=self._disconnected)

    def _handle(self, batch: list[Any]) -> None:
        with self._lock:
            self.received.extend(batch)
        if self._on_batch is not None:
            self._on_batch(self, batch)

    def _disconnected(self) -> None:
        self.disconnects += 1

    def of(self, tag: str) -> list[Any]:
        with self._lock:
            return [m["i"] for m in self.received if m.get("q") == tag]

    @contextmanager
    def running(self) -> Iterator[Loop]:
        with GUARD.forced(self._fast):
            self.loop.start()
            try:
                assert self.loop.connected.wait(10), "the consumer never connected"
                # The path under test is the one taken (else both variants would test kombu's).
                assert (self.loop._fast is not None) is self._fast
                yield self
            finally:
                self.loop.stop()
        assert not self.loop.is_alive()


def _push(app: Celery, queue: Queue, messages: list[dict[str, Any]], **options: Any) -> None:
    """Publish each of ``messages`` with kombu's own producer (as a client of any version would)."""
    with app.connection_for_write() as conn:
        producer = Producer(conn.default_channel)
        for m in messages:
            producer.publish(encode([m]), exchange=queue.exchange, routing_key=queue.routing_key,
                             content_type=CONTENT_TYPE, content_encoding=CONTENT_ENCODING, **options)


def test_the_guard_accepts_the_installed_libraries() -> None:
    assert GUARD._check() is None, GUARD._check()


def test_an_envelope_decodes_as_kombus_message_does(redis_url: str) -> None:
    # The contract with kombu's Redis envelope: what ConsumerLoop and a worker's admission read.
    queue = _list("envelope")
    app = _app(redis_url)
    _push(app, queue, [{"t": "x", "i": 1}], headers={"forseti-sig": "w1 1 n m"})
    with Connection(redis_url) as conn:
        channel = conn.default_channel
        raw = channel.client.rpop(queue.name)
        ours = redis_consume.envelope(raw)
        theirs = channel.Message(json.loads(raw), channel=channel)  # what kombu's consumer builds
    assert ours.body == theirs.body
    assert ours.headers == theirs.headers and ours.headers["forseti-sig"] == "w1 1 n m"
    assert ours.delivery_info == theirs.delivery_info
    assert ours.delivery_info["routing_key"] == queue.name
    for bad in (b"not json", b"[1]", b'{"body": "e30", "properties": {"body_encoding": "base64"}}',
                b'{"body": "e30=", "properties": {"body_encoding": "rot13"}}', b'{"properties": [1]}'):
        with pytest.raises(ValueError):
            redis_consume.envelope(bad)


@both
def test_each_list_is_read_in_order(redis_url: str, fast: bool) -> None:
    app = _app(redis_url)
    a, b = _list("a"), _list("b")
    publisher = Publisher(app.connection_for_write())
    try:
        with Loop(app, [a, b], fast).running() as loop:
            for i in range(300):
                publisher.publish(a.exchange, a.routing_key, [{"t": "x", "q": "a", "i": i}])
                publisher.publish(b.exchange, b.routing_key, [{"t": "x", "q": "b", "i": i}])
            wait_for(lambda: len(loop.received) >= 600, 20, 0.02, lambda: f"got {len(loop.received)} of 600")
            assert loop.of("a") == list(range(300))
            assert loop.of("b") == list(range(300))
    finally:
        publisher.close()


@both
def test_a_flooded_list_does_not_starve_another(redis_url: str, fast: bool) -> None:
    # 2,000 messages wait in one list, one in the other, before the consumer starts: kombu's round
    # robin reads the other's second (the last list read goes last), not after the flood.
    app = _app(redis_url)
    flood, other = _list("flood"), _list("other")
    with redis.Redis.from_url(redis_url) as r:
        r.delete(flood.name, other.name)
    _push(app, flood, [{"t": "x", "q": "f", "i": i} for i in range(2000)])
    _push(app, other, [{"t": "x", "q": "o", "i": 0}])
    with Loop(app, [flood, other], fast).running() as loop:
        wait_for(lambda: len(loop.received) >= 2001, 60, 0.05, lambda: f"got {len(loop.received)} of 2001")
        position = [m["q"] for m in loop.received].index("o")
        assert position <= 1, f"the other list's message came after {position} of the flood's"
        assert loop.of("f") == list(range(2000))


@both
def test_a_message_published_with_a_priority_is_read_from_its_sub_list(redis_url: str, fast: bool) -> None:
    app = _app(redis_url)
    queue = _list("pri")
    with Loop(app, [queue], fast).running() as loop:
        _push(app, queue, [{"t": "x", "q": "p", "i": 1}], priority=5)  # kombu pushes to name + sep + "3"
        _push(app, queue, [{"t": "x", "q": "p", "i": 2}])
        wait_for(lambda: len(loop.received) >= 2, 10, 0.02, lambda: f"got {loop.received}")
        assert sorted(loop.of("p")) == [1, 2]


@both
def test_fanouts_and_lists_under_a_global_key_prefix(redis_url: str, fast: bool) -> None:
    app = _app(redis_url, global_keyprefix="forseti-t-pfx:")
    names = Names(f"forseti-t{uuid.uuid4().hex[:8]}", single_active_consumer=False)
    bcast = names.bcast_queue("w1@host", uuid.uuid4().hex[:8])
    publisher = Publisher(app.connection_for_write())
    try:
        with Loop(app, [names.leader_queue, bcast], fast).running() as loop:
            for i in range(20):
                publisher.publish(names.exchange, names.leader, [{"t": "x", "q": "l", "i": i}],
                                  declare=[names.leader_queue])
                publisher.publish(names.bcast_exchange, "", [{"t": "x", "q": "b", "i": i}])
            wait_for(lambda: len(loop.received) >= 40, 10, 0.02, lambda: f"got {len(loop.received)} of 40")
            assert loop.of("l") == list(range(20)) and loop.of("b") == list(range(20))
    finally:
        publisher.close()
    with redis.Redis.from_url(redis_url) as r:
        assert not r.exists(names.leader), "the prefix was not applied"


@both
def test_queues_added_and_cancelled_at_runtime_from_the_loop_thread(redis_url: str, fast: bool) -> None:
    app = _app(redis_url)
    first, later = _list("first"), _list("later")
    names = Names(f"forseti-t{uuid.uuid4().hex[:8]}", single_active_consumer=False)
    bcast = names.bcast_queue("w1@host", uuid.uuid4().hex[:8])

    def on_batch(loop: Loop, batch: list[Any]) -> None:
        for m in batch:
            if m.get("do") == "add":
                loop.loop.add_queue(later)
                loop.loop.add_queue(bcast)
            elif m.get("do") == "cancel":
                loop.loop.cancel_queue(later)

    publisher = Publisher(app.connection_for_write())
    try:
        with Loop(app, [first], fast, on_batch=on_batch).running() as loop:
            publisher.publish(first.exchange, first.routing_key, [{"t": "x", "do": "add", "q": "f", "i": 0}])
            wait_for(lambda: loop.of("f") == [0], 10, 0.02, "the first queue's message")
            publisher.publish(later.exchange, later.routing_key, [{"t": "x", "q": "l", "i": 1}])
            wait_for(lambda: loop.of("l") == [1], 10, 0.02, "the added queue's message")

            def fanout_heard() -> bool:  # kombu subscribes on its next round: a fanout before is lost
                publisher.publish(names.bcast_exchange, "", [{"t": "x", "q": "b", "i": 0}])
                return bool(loop.of("b"))
            wait_for(fanout_heard, 10, 0.05, "the added fanout's message")

            publisher.publish(first.exchange, first.routing_key, [{"t": "x", "do": "cancel", "q": "f", "i": 2}])
            wait_for(lambda: loop.of("f") == [0, 2], 10, 0.02, "the cancel")
            publisher.publish(later.exchange, later.routing_key, [{"t": "x", "q": "l", "i": 3}])
            publisher.publish(first.exchange, first.routing_key, [{"t": "x", "q": "f", "i": 4}])
            wait_for(lambda: loop.of("f") == [0, 2, 4], 10, 0.02, "the first queue's next message")
            assert loop.of("l") == [1]
            with redis.Redis.from_url(redis_url) as r:
                assert r.llen(later.name) == 1, "the cancelled queue was read"
                r.delete(later.name)
    finally:
        publisher.close()


@both
def test_stop_with_a_wake_ends_a_pending_read(redis_url: str, fast: bool) -> None:
    # A tick interval far longer than the join: only the wake can end the read in time.
    app = _app(redis_url, brpop_timeout=30)
    queue = _list("stop")
    loop = Loop(app, [queue], fast, interval=60)
    with GUARD.forced(fast):
        loop.loop.start()
        assert loop.loop.connected.wait(10)
        assert (loop.loop._fast is not None) is fast
        loop.loop.stop(timeout=15, wake=lambda: _push(app, queue, [{"t": "x", "q": "w", "i": 0}]))
    assert not loop.loop.is_alive(), "stop() did not end the pending read"


def _kill_clients(redis_url: str, name: str) -> int:
    with redis.Redis.from_url(redis_url) as r:
        ids = [c["id"] for c in r.client_list() if c.get("name") == name]
        for client_id in ids:
            r.client_kill_filter(_id=client_id)
    return len(ids)


@both
def test_a_killed_connection_reconnects_and_loses_nothing_pushed_meanwhile(redis_url: str, fast: bool) -> None:
    name = f"forseti-t-{uuid.uuid4().hex[:8]}"
    app = _app(redis_url, client_name=name)
    writer = _app(redis_url)
    queue = _list("kill")
    with Loop(app, [queue], fast).running() as loop:
        _push(writer, queue, [{"t": "x", "q": "k", "i": 0}])
        wait_for(lambda: loop.of("k") == [0], 10, 0.02, "the first message")
        assert _kill_clients(redis_url, name) >= 1
        _push(writer, queue, [{"t": "x", "q": "k", "i": i} for i in range(1, 50)])
        wait_for(lambda: len(loop.of("k")) >= 50, 20, 0.02, lambda: f"got {loop.of('k')}")
        assert loop.of("k") == list(range(50))
        assert loop.disconnects >= 1, "the connection was not lost: the test tested nothing"


@both
def test_a_malformed_push_is_skipped_and_the_next_message_handled(redis_url: str, fast: bool) -> None:
    app = _app(redis_url)
    queue = _list("bad")
    with Loop(app, [queue], fast).running() as loop, redis.Redis.from_url(redis_url) as r:
        for raw in (b"not json", b'{"body": "e30", "properties": {"body_encoding": "base64"}}', b"[]",
                    b"[" * 100_000):  # the last: too deep for json (a RecursionError)
            r.lpush(queue.name, raw)
        _push(app, queue, [{"t": "x", "q": "g", "i": 1}])
        wait_for(lambda: loop.of("g") == [1], 10, 0.02, "the good message after the bad ones")
        if fast:  # kombu's own path fails the connection on a message it cannot parse
            assert loop.disconnects == 0


def _hold_confirmations(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], threading.Event]:
    """Each ``PSUBSCRIBE`` recorded; their confirmations left unread until the event is set."""
    order: list[str] = []
    confirm = threading.Event()
    psubscribe, read_fanouts = redis.client.PubSub.psubscribe, redis_consume.RedisConsumer._read_fanouts

    def recorded(pubsub: Any, *topics: Any) -> Any:
        order.append("psubscribe")
        return psubscribe(pubsub, *topics)

    def held(consumer: Any) -> None:
        if confirm.wait(0.001):
            read_fanouts(consumer)

    monkeypatch.setattr(redis.client.PubSub, "psubscribe", recorded)
    monkeypatch.setattr(redis_consume.RedisConsumer, "_read_fanouts", held)
    return order, confirm


def _held(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Names, Any, Loop, Any]:
    """A loop (not started) over a reply list holding one message and a fanout, whose
    subscriptions' confirmations are held (:func:`_hold_confirmations`)."""
    app = _app(redis_url)
    names = Names(f"forseti-t{uuid.uuid4().hex[:8]}", single_active_consumer=False)
    reply, bcast = _list("reply"), names.bcast_queue("w1@host", uuid.uuid4().hex[:8])
    _push(app, reply, [{"t": "x", "q": "r", "i": 0}])
    held = _hold_confirmations(monkeypatch)
    return app, names, reply, Loop(app, [reply, bcast], True), held


def test_a_list_is_read_before_the_fanouts_are_subscribed_and_on_connect_waits_for_them(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A new client's first answer waits for no pub/sub connection: the BRPOP goes out first, a
    # message in a list is handled while the fanout's subscription is unconfirmed, and only then
    # is the loop connected (a client trusts its cache and routes from on_connect on).
    app, names, _, loop, (order, confirm) = _held(redis_url, monkeypatch)
    connects: list[bool] = []
    loop.loop._on_connect = lambda: connects.append(confirm.is_set())
    publisher = Publisher(app.connection_for_write())
    with GUARD.forced(True):
        loop.loop.start()
        try:
            wait_for(lambda: loop.of("r") == [0], 10, 0.01, "the list's message was not read")
            assert order == ["psubscribe"]  # made once the BRPOP was out (it read the message)
            assert not loop.loop.connected.is_set() and connects == []
            confirm.set()
            assert loop.loop.connected.wait(10) and connects == [True]
            publisher.publish(names.bcast_exchange, "", [{"t": "x", "q": "b", "i": 1}])
            wait_for(lambda: loop.of("b") == [1], 10, 0.01, "the fanout's message was not read")
        finally:
            publisher.close()
            loop.loop.stop()
    assert not loop.loop.is_alive()


def test_a_stop_before_the_fanouts_are_subscribed_wakes_the_pending_read(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A client closed right after its first answer: its BRPOP is out though the loop is not yet
    # connected, so the stop sends the wake (else it waits for the BRPOP's timeout).
    app, _, reply, loop, _ = _held(redis_url, monkeypatch)
    woken: list[bool] = []
    connects: list[int] = []
    loop.loop._on_connect = lambda: connects.append(1)
    with GUARD.forced(True):
        loop.loop.start()
        wait_for(lambda: loop.of("r") == [0], 10, 0.01, "the list's message was not read")
        loop.loop.stop(wake=lambda: woken.append(_push(app, reply, []) is None))
    assert woken == [True] and connects == []  # and the owner never heard of a connection
    assert not loop.loop.is_alive()
