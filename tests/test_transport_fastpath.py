"""The declarations a client's first request waits for (issue 15), on real brokers: what the
transport modules skip or send without waiting keeps today's ordering and delivery.

On Redis a queue of the default exchange is a plain list: neither a publisher nor a consumer
declares it before use (kombu's declaration only counts it), and a new publisher pushes on the
connection kombu opened to ping the broker. On RabbitMQ a publisher's and a consumer's
declarations go out without waiting for their answers (``nowait``), ahead of the publish or
consume on the same channel. With the guard forced off, kombu's own path (every queue declared,
one round trip each) must give the same results.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery import Celery

from forseti_celery.core import compat, transport
from forseti_celery.core.broker import Publisher, RestartIntensity
from forseti_celery.core.consumer import ConsumerLoop
from forseti_celery.core.names import Names
from forseti_celery.core.transport import redis_consume
from forseti_celery.testing import wait_for


def _names(broker_url: str) -> Names:
    return Names(f"forseti-t{uuid.uuid4().hex[:8]}", single_active_consumer=broker_url.startswith("amqp"))


@contextmanager
def _guard(on: bool) -> Iterator[None]:
    with (compat.KOMBU_REDIS_DECLARE.forced(on), compat.KOMBU_REDIS_PUBLISH.forced(on),
          redis_consume.KOMBU_REDIS_CONSUME.forced(on)):
        yield


@contextmanager
def _loop(app: Celery, queues: list[Any], received: list[Any]) -> Iterator[ConsumerLoop]:
    lock = threading.Lock()

    def handle(batch: list[Any]) -> None:
        with lock:
            received.extend(batch)

    loop = ConsumerLoop("test-fastpath", app.connection_for_read, lambda: queues, handle,
                        intensity=RestartIntensity(3, 10), interval=0.05)
    loop.start()
    try:
        assert loop.connected.wait(10), "the consumer never connected"
        yield loop
    finally:
        loop.stop()


@pytest.mark.parametrize("guarded", [True, False], ids=["fast path", "kombu's path"])
def test_what_a_new_publisher_sends_right_after_declaring_a_reply_queue_arrives_whole_and_in_order(
        broker_url: str, guarded: bool) -> None:
    # A client's first request: its reply queue declared (Redis: not at all; RabbitMQ: without
    # waiting), then published to at once; the consumer started afterwards gets everything, in order.
    app = Celery("fastpath-test", broker=broker_url, set_as_current=False)
    names = _names(broker_url)
    reply = names.reply_queue(uuid.uuid4().hex)
    received: list[Any] = []
    with _guard(guarded):
        publisher = Publisher(app.connection_for_write())
        try:
            publisher.declare(reply)
            for i in range(50):
                publisher.publish(names.exchange, reply.routing_key, [{"t": "r", "i": i}])
            with _loop(app, [reply], received):
                wait_for(lambda: len(received) >= 50, 10, 0.02, lambda: f"got {len(received)} of 50")
                publisher.publish(names.exchange, reply.routing_key, [{"t": "r", "i": 50}])
                wait_for(lambda: len(received) >= 51, 10, 0.02, "a publish to a consumed queue was lost")
        finally:
            publisher.close()
    assert [m["i"] for m in received] == list(range(51))


@pytest.mark.parametrize("guarded", [True, False], ids=["fast path", "kombu's path"])
def test_a_consumer_that_declares_nothing_up_front_still_hears_a_fanout_and_its_leader_queue(
        broker_url: str, guarded: bool) -> None:
    # The consumer declares a fanout subscription (its binding lives in the channel) before reading,
    # and nothing else on Redis; the leader queue (declared by its publisher, as the client does)
    # and the fanout both deliver, each in order.
    app = Celery("fastpath-test", broker=broker_url, set_as_current=False)
    names = _names(broker_url)
    bcast = names.bcast_queue("w1@host", uuid.uuid4().hex[:8])
    received: list[Any] = []
    with _guard(guarded):
        publisher = Publisher(app.connection_for_write())
        try:
            with _loop(app, [names.leader_queue, bcast], received):
                for i in range(20):
                    publisher.publish(names.exchange, names.leader, [{"t": "l", "i": i}],
                                      declare=[names.leader_queue])
                    publisher.publish(names.bcast_exchange, "", [{"t": "b", "i": i}])
                wait_for(lambda: len(received) >= 40, 10, 0.02, lambda: f"got {len(received)} of 40")
        finally:
            publisher.close()
            with app.connection_for_write() as conn:
                names.leader_queue(conn.default_channel).delete()
    assert [m["i"] for m in received if m["t"] == "l"] == list(range(20))
    assert [m["i"] for m in received if m["t"] == "b"] == list(range(20))


def test_on_redis_a_new_publishers_first_request_opens_one_connection(redis_url: str) -> None:
    # Declaring a client's reply queue and its first push used a second connection of the channel's
    # (kombu's LLEN, then a new client per publish): the first request of a new client paid for it.
    app = Celery("fastpath-test", broker=redis_url, set_as_current=False)
    names = _names(redis_url)
    reply = names.reply_queue(uuid.uuid4().hex)
    publisher = Publisher(app.connection_for_write())
    try:
        publisher.declare(reply)
        publisher.publish(names.exchange, reply.routing_key, [{"t": "r"}])
        channel = publisher._ready().channel
        assert channel._pool is None, "a second pool (and connection) was made for the first request"
        assert channel.client.llen(reply.name) == 1
        channel.client.delete(reply.name)
    finally:
        publisher.close()


def test_redis_declares_only_what_a_named_exchange_routes(redis_url: str) -> None:
    names = _names(redis_url)
    redis_transport = transport.named("redis")
    bcast = names.bcast_queue("w1@host", "x")
    assert not redis_transport.needs_declaring(names.reply_queue("c"))
    assert not redis_transport.needs_declaring(names.leader_queue)
    assert not redis_transport.needs_declaring(bcast)  # a fanout publish is a PUBLISH: no binding read
    assert compat.redis_declare_needed(bcast, consumer=True)  # its subscription is the channel's binding
    with compat.KOMBU_REDIS_DECLARE.forced(False):
        assert redis_transport.needs_declaring(names.reply_queue("c"))
    assert transport.named("amqp").needs_declaring(names.reply_queue("c"))


def test_kombus_redis_declaration_of_a_default_exchange_queue_writes_nothing_to_redis(redis_url: str) -> None:
    # The contract behind KOMBU_REDIS_DECLARE: were kombu to start storing something when declaring
    # such a queue (a binding, an expiry), skipping the declaration would lose it.
    from kombu import Connection

    names = _names(redis_url)
    reply = names.reply_queue(uuid.uuid4().hex)
    with Connection(redis_url) as conn:
        channel = conn.default_channel
        client = channel.client
        assert reply(channel).declare() == reply.name
        stored = [k for k in client.keys("*") if reply.name.encode() in k]
        stored += [k for k in client.keys("_kombu.binding.*")
                   if any(reply.name.encode() in m for m in client.smembers(k))]
        assert not stored, f"kombu's declaration stored {stored} on Redis"


def test_on_redis_a_new_consumer_declares_its_fanout_subscription_on_the_connection_it_pinged_with(
        redis_url: str) -> None:
    # A client's exits subscription is declared before its reply thread reads: on a second
    # connection of the channel's (kombu's second pool) it cost a new client's first request one more.
    app = Celery("fastpath-test", broker=redis_url, set_as_current=False)
    names = _names(redis_url)
    bcast = names.bcast_queue("w1@host", uuid.uuid4().hex[:8])
    received: list[Any] = []
    publisher = Publisher(app.connection_for_write())
    try:
        with _loop(app, [bcast], received) as loop:
            consumer = loop._fast or loop._consumer  # kombu's own, or Redis's reads without its event loop
            assert consumer is not None
            assert consumer.channel._pool is None, "the consumer made a second pool before reading"
            publisher.publish(names.bcast_exchange, "", [{"t": "b"}])
            wait_for(lambda: received == [{"t": "b"}], 10, 0.02, "the fanout subscription heard nothing")
    finally:
        publisher.close()


def test_kombus_redis_channel_close_deletes_no_list_of_the_default_exchange(redis_url: str) -> None:
    # The other half of that contract: a consumer's declaration of its auto_delete reply queue
    # would only matter to the channel's close, which deletes auto_delete fanout queues, no list.
    from kombu import Connection

    names = _names(redis_url)
    reply = names.reply_queue(uuid.uuid4().hex)
    with Connection(redis_url) as conn:
        channel = conn.channel()
        reply(channel).declare()
        channel.client.lpush(reply.name, b"left")
        channel.close()
        with Connection(redis_url) as other:
            client = other.default_channel.client
            assert client.llen(reply.name) == 1, "kombu's close deleted an auto_delete list"
            client.delete(reply.name)
