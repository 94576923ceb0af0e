"""The broker plumbing on real brokers: the consumer thread and the publisher."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis
from celery import Celery
from kombu import Exchange, Queue

from forseti_celery import Forseti, ForsetiTimeout
from forseti_celery.core.broker import Publisher, RestartIntensity
from forseti_celery.core.consumer import ConsumerLoop
from forseti_celery.testing import wait_for


def test_a_queue_added_to_a_loop_that_has_served_for_a_while_is_consumed(broker_url: str) -> None:
    # A Redis leader elected after start-up adds the leader queue to a loop already running: it
    # must be consumed, not silently ignored (the new leader would never answer).
    app = Celery("broker-test", broker=broker_url, set_as_current=False)
    tag = uuid.uuid4().hex[:8]
    exchange = Exchange("", type="direct")
    first = Queue(f"forseti-t-{tag}-a", exchange, routing_key=f"forseti-t-{tag}-a", auto_delete=True)
    later = Queue(f"forseti-t-{tag}-b", exchange, routing_key=f"forseti-t-{tag}-b", auto_delete=True)
    received: list[object] = []
    add = threading.Event()

    def tick() -> None:
        if add.is_set():
            loop.add_queue(later)

    loop = ConsumerLoop("test-loop", app.connection_for_read, lambda: [first], received.extend,
                        intensity=RestartIntensity(3, 10), tick=tick, interval=0.05)
    publisher = Publisher(app.connection_for_write())
    loop.start()
    try:
        assert loop.connected.wait(10)
        publisher.publish(exchange, first.routing_key, [{"t": "one"}])
        wait_for(lambda: received == [{"t": "one"}], 10, 0.02, "the first queue was not consumed")
        time.sleep(0.3)  # several rounds of the event loop
        add.set()
        publisher.publish(exchange, later.routing_key, [{"t": "two"}], declare=[later])
        wait_for(lambda: {"t": "two"} in received, 10, 0.02, "the queue added later was never consumed")
    finally:
        loop.stop()
        publisher.close()


def test_publish_many_sends_every_batch_in_order_and_a_plain_publish_after_it(broker_url: str) -> None:
    # (Every message has a text type "t": the worker's decoder drops one without.)
    # On Redis the batches go out as one pipeline through kombu's own publishing code: each must
    # arrive as its own broker message, in order, and the channel must publish normally afterwards.
    app = Celery("broker-test", broker=broker_url, set_as_current=False)
    tag = uuid.uuid4().hex[:8]
    exchange = Exchange("", type="direct")
    queues = [Queue(f"forseti-t-{tag}-{n}", exchange, routing_key=f"forseti-t-{tag}-{n}", auto_delete=True)
              for n in ("a", "b")]
    received: dict[str, list[object]] = {"a": [], "b": []}
    loop = ConsumerLoop("test-loop", app.connection_for_read, lambda: queues,
                        lambda batch: received[str(batch[0]["q"])].append([m["i"] for m in batch]),
                        intensity=RestartIntensity(3, 10), interval=0.05)
    publisher = Publisher(app.connection_for_write())
    loop.start()
    try:
        assert loop.connected.wait(10)
        a, b = (q.routing_key for q in queues)
        publisher.publish_many(exchange, [(a, [{"t": "x", "q": "a", "i": 1}, {"t": "x", "q": "a", "i": 2}]),
                                          (b, [{"t": "x", "q": "b", "i": 3}]), (a, [{"t": "x", "q": "a", "i": 4}])],
                               lambda rk: queues)
        publisher.publish(exchange, b, [{"t": "x", "q": "b", "i": 5}])
        wait_for(lambda: received == {"a": [[1, 2], [4]], "b": [[3], [5]]}, 10, 0.02,
                 lambda: f"received {received}")
    finally:
        loop.stop()
        publisher.close()


def test_closing_a_client_ends_its_reply_thread_without_waiting_for_its_poll_interval(redis_url: str) -> None:
    # On Redis the reply thread blocks in BRPOP for kombu's brpop_timeout (1 s by default, made
    # 60 s here): closing must wake it, not wait for the poll to run out.
    app = Celery("close-test", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"polling_interval": 60}
    forseti = Forseti(app, namespace=f"forseti-close-{uuid.uuid4().hex[:8]}", timeout=0.2)
    client = forseti.client
    with pytest.raises(ForsetiTimeout):
        client.get_metrics(0.2)  # starts the reply thread, which then waits in BRPOP
    loop = client._loop
    assert loop.connected.wait(10)
    started = time.perf_counter()
    forseti.close()
    print(f"\nclose: {(time.perf_counter() - started) * 1000:.1f} ms")
    assert not loop.is_alive(), "the reply thread still waits on its poll after close()"


def test_a_redis_queue_lives_as_long_as_its_latest_expiring_message(redis_url: str) -> None:
    # Redis lists have no per-message TTL: the list's TTL only ever rises, so a request with a
    # short deadline never drops another client's request still waiting for its answer.
    app = Celery("broker-test", broker=redis_url, set_as_current=False)
    name = f"forseti-t-{uuid.uuid4().hex[:8]}"
    publisher = Publisher(app.connection_for_write())
    try:
        publisher.publish(Exchange(""), name, [{"t": "long"}], expiration=30)
        publisher.publish(Exchange(""), name, [{"t": "short"}], expiration=0.2)
        with redis.Redis.from_url(redis_url) as r:
            assert r.llen(name) == 2 and r.pttl(name) > 20_000
            r.delete(name)
            publisher.publish(Exchange(""), name, [{"t": "short"}], expiration=0.2)
            wait_for(lambda: r.llen(name) == 0, 10, 0.05, "the list outlived its only message's expiration")
    finally:
        publisher.close()
