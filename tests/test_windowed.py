"""RabbitMQ's windowed consumer (a worker's node queue, ``ConsumerLoop(windowed=...)``): each message
is acknowledged once handled, and one the broker delivers again after a lost connection is dropped,
so nothing is handled twice, as with ``no_ack`` (issue 15 moved the ack after the handling)."""

from __future__ import annotations

import socket
import threading
import uuid

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue

from forseti_celery.core.broker import Publisher, RestartIntensity
from forseti_celery.core.consumer import ConsumerLoop
from forseti_celery.core.protocol import Message
from forseti_celery.testing import wait_for


def test_a_windowed_message_is_handled_at_most_once_across_a_lost_connection(
        rabbitmq_url: str, caplog: pytest.LogCaptureFixture) -> None:
    app = Celery("windowed-test", broker=rabbitmq_url, set_as_current=False)
    name = f"forseti-t-win-{uuid.uuid4().hex[:8]}"
    exchange = Exchange("", type="direct")
    # Outlives the lost connection (an auto_delete queue would go with its consumer): what was
    # delivered on it and not acknowledged is delivered again, marked redelivered.
    queue = Queue(name, exchange, routing_key=name, auto_delete=False, queue_arguments={"x-expires": 60_000})
    handled: list[int] = []
    cut = threading.Event()

    def handle(batch: list[Message]) -> None:
        for m in batch:
            handled.append(int(m["i"]))
            if m["i"] == 1 and not cut.is_set():  # the connection is lost while message 1 is handled
                cut.set()
                assert loop._consumer is not None
                loop._consumer.channel.connection.transport.sock.shutdown(socket.SHUT_RDWR)

    loop = ConsumerLoop("test-windowed", app.connection_for_read, lambda: [queue], handle,
                        intensity=RestartIntensity(5, 10), interval=0.05, windowed=lambda: [queue])
    publisher = Publisher(app.connection_for_write())
    publisher.declare(queue)
    for i in range(5):  # all in the queue before the loop consumes: all in its window at once
        publisher.publish(exchange, name, [{"t": "x", "i": i}])
    try:
        with caplog.at_level("INFO", logger="forseti_celery.core.consumer"):
            loop.start()
            wait_for(lambda: cut.is_set() and loop.connected.is_set(), 20, 0.02, "the loop never reconnected")
            publisher.publish(exchange, name, [{"t": "x", "i": 5}])
            wait_for(lambda: 5 in handled, 20, 0.02, f"nothing handled after the reconnection: {handled}")
        assert handled[:2] == [0, 1] and handled[-1] == 5
        assert len(handled) == len(set(handled)), f"a message handled twice: {handled}"
        assert "dropped a message delivered again after a reconnection" in caplog.text  # 1 came back
    finally:
        loop.stop()
        publisher.close()
        with Connection(rabbitmq_url) as conn:
            conn.default_channel.queue_delete(name)


def test_windowed_messages_are_acknowledged_several_at_once_in_order_and_none_is_left_unacknowledged(
        rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from kombu.message import Message as KombuMessage

    acks: list[bool] = []
    ack = KombuMessage.ack

    def counting_ack(self: KombuMessage, multiple: bool = False) -> None:
        acks.append(multiple)
        ack(self, multiple=multiple)

    monkeypatch.setattr(KombuMessage, "ack", counting_ack)
    app = Celery("windowed-test", broker=rabbitmq_url, set_as_current=False)
    name = f"forseti-t-win-{uuid.uuid4().hex[:8]}"
    exchange = Exchange("", type="direct")
    queue = Queue(name, exchange, routing_key=name, auto_delete=False, queue_arguments={"x-expires": 60_000})
    handled: list[int] = []
    n = 3 * ConsumerLoop.acks_every + 1  # the last one's acknowledgement waits for a tick
    loop = ConsumerLoop("test-windowed", app.connection_for_read, lambda: [queue],
                        lambda batch: handled.extend(int(m["i"]) for m in batch),
                        intensity=RestartIntensity(5, 10), interval=0.05, windowed=lambda: [queue])
    publisher = Publisher(app.connection_for_write())
    publisher.declare(queue)
    try:
        loop.start()
        wait_for(loop.connected.is_set, 20, 0.02, "the loop never connected")
        for i in range(n):
            publisher.publish(exchange, name, [{"t": "x", "i": i}])
        wait_for(lambda: len(handled) == n and len(acks) == 4, 20, 0.02, f"handled {handled}, acks {acks}")
        assert handled == list(range(n))
        assert acks == [True] * 4  # three of acks_every, then the last one at a tick
    finally:
        loop.stop()
        publisher.close()
    # Nothing was left unacknowledged: a new consumer of the queue gets nothing again.
    with Connection(rabbitmq_url) as conn:
        channel = conn.default_channel
        try:
            assert channel.basic_get(name, no_ack=True) is None
        finally:
            channel.queue_delete(name)
