"""The RabbitMQ publish handed straight to py-amqp (:mod:`forseti_celery.core.transport.amqp_wire`),
against kombu's own producer and consumer on a real RabbitMQ: kombu's consumer gets from it what
kombu's producer would have sent (body, headers, content type and encoding, delivery mode,
priority, expiration), in the order published (``publish`` and ``publish_many`` mixed), signed
headers admitted, an expired message dropped by the broker; a killed connection raises
:class:`BrokerUnavailable` and the next publish goes out once on a new one. With the guard
forced off, kombu's own path gives the same results. The frames the wire writes itself are
py-amqp's byte for byte; a body past one frame goes through py-amqp's writer.
"""

from __future__ import annotations

import select
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import amqp
import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue

from forseti_celery.core import protocol as p
from forseti_celery.core.broker import Publisher
from forseti_celery.core.errors import BrokerUnavailable
from forseti_celery.core.signing import Signer
from forseti_celery.core.transport import amqp_wire
from forseti_celery.testing import wait_for

DEFAULT = Exchange("")
WIRED = pytest.mark.parametrize("wired", [True, False], ids=["wire", "kombu"])


def test_the_guard_accepts_the_installed_kombu_and_py_amqp() -> None:
    # Past its range every publish would silently take kombu's slower path: widen the range
    # after this module's contracts pass on the new version.
    assert amqp_wire.KOMBU_AMQP_WIRE._check() is None


def test_the_guard_refuses_a_py_amqp_whose_frame_writer_holds_no_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    # A wire writes under the writer's own lock; found none, its frames could interleave with py-amqp's.
    import amqp.method_framing

    def frame_writer(connection: Any, transport: Any) -> Any:
        def write_frame(*args: Any) -> None:
            transport.write(b"")
        return write_frame

    monkeypatch.setattr(amqp.method_framing, "frame_writer", frame_writer)
    assert amqp_wire.KOMBU_AMQP_WIRE._check() == "py-amqp's frame writer holds no buffer_lock"


@contextmanager
def _publisher(url: str, wired: bool, *queues: Queue, **kwargs: Any) -> Iterator[tuple[Publisher, list[int]]]:
    """A publisher with ``queues`` declared, the guard forced on or off, and the count of the
    publishes the wire sent (none with the guard off)."""
    app = Celery("amqp-wire-test", broker=url, set_as_current=False)
    sent: list[int] = []
    publish = amqp_wire.Wire.publish

    def counted(self: amqp_wire.Wire, *args: Any) -> None:
        publish(self, *args)
        sent.append(1)

    with amqp_wire.KOMBU_AMQP_WIRE.forced(wired), pytest.MonkeyPatch.context() as mp:
        mp.setattr(amqp_wire.Wire, "publish", counted)
        publisher = Publisher(app.connection_for_write(), **kwargs)
        try:
            for queue in queues:
                publisher.declare(queue)
            yield publisher, sent
        finally:
            with Connection(url) as conn, conn.channel() as channel:
                for queue in queues:
                    channel.queue_delete(queue.name)
            publisher.close()


def _queue() -> Queue:
    name = f"forseti-t-amqpwire-{uuid.uuid4().hex[:8]}"
    return Queue(name, DEFAULT, routing_key=name, durable=False)


def _get(conn: Connection, name: str) -> Any:
    """The next message of queue ``name`` through kombu's consumer (its body left undecoded)."""
    return wait_for(lambda: conn.default_channel.basic_get(name, no_ack=True), 5, 0.01, f"nothing came on {name}")


def _seen(message: Any) -> dict[str, Any]:
    """What kombu's consumer exposes of ``message``, but its delivery tag (one per message)."""
    return {"body": message.body, "headers": message.headers, "content_type": message.content_type,
            "content_encoding": message.content_encoding, "properties": message.properties,
            "delivery_info": {k: message.delivery_info.get(k) for k in ("exchange", "routing_key")}}


def _ids(conn: Connection, name: str, n: int) -> list[int]:
    return [m["i"] for _ in range(n) for m in p.decode(_get(conn, name).body, routed=False)]


def _depth(url: str, name: str) -> int:
    """Messages in queue ``name``; -1 before it exists (a publisher declares without waiting)."""
    with Connection(url) as conn:
        try:
            return int(conn.default_channel.queue_declare(name, passive=True).message_count)
        except conn.channel_errors:
            return -1


def test_kombu_gets_from_the_wire_what_kombus_producer_sends(rabbitmq_url: str) -> None:
    queue = _queue()
    msgs = [{"t": p.CAST, "k": "k1", "payload": "é\"x"}]
    sent: dict[bool, int] = {}
    for wired in (True, False):  # the wire's messages first, kombu's second
        with _publisher(rabbitmq_url, wired) as (publisher, count):
            publisher.declare(queue)
            publisher.publish(DEFAULT, queue.name, msgs)
            publisher.publish(DEFAULT, queue.name, msgs, expiration=60.0)
            publisher.publish(DEFAULT, queue.name, msgs, expiration=30.0005)  # kombu: whole ms, rounded down
            sent[wired] = len(count)
    assert sent == {True: 3, False: 0}
    with Connection(rabbitmq_url) as conn:
        got = [_seen(_get(conn, queue.name)) for _ in range(6)]
        conn.default_channel.queue_delete(queue.name)
    assert got[:3] == got[3:]
    assert [g["properties"] for g in got[:2]] == [
        {"content_type": p.CONTENT_TYPE, "content_encoding": p.CONTENT_ENCODING, "application_headers": {},
         "delivery_mode": 2, "priority": 0},
        {"content_type": p.CONTENT_TYPE, "content_encoding": p.CONTENT_ENCODING, "application_headers": {},
         "delivery_mode": 2, "priority": 0, "expiration": "60000"},
    ]
    assert got[2]["properties"]["expiration"] == "30000"
    assert got[0]["body"] == p.encode(msgs).decode(p.CONTENT_ENCODING)  # py-amqp decodes a UTF-8 body
    assert got[0]["delivery_info"] == {"exchange": "", "routing_key": queue.name}


def test_a_fanout_already_declared_goes_out_on_the_wire_as_kombus_own(rabbitmq_url: str) -> None:
    exchange = Exchange(f"forseti-t-amqpwire-{uuid.uuid4().hex[:8]}.bcast", type="fanout", durable=False,
                        auto_delete=False)
    queue = Queue(f"forseti-t-amqpwire-{uuid.uuid4().hex[:8]}", exchange, durable=False)
    try:
        for wired in (True, False):
            with _publisher(rabbitmq_url, wired) as (publisher, count):
                publisher.declare(queue)
                for i in range(3):  # the first declares the exchange through kombu; the wire sends the next
                    publisher.publish(exchange, "", [{"t": p.HEARTBEAT, "i": i}])
                assert len(count) == (2 if wired else 0)
        with Connection(rabbitmq_url) as conn:
            got = [_get(conn, queue.name) for _ in range(6)]
            conn.default_channel.queue_delete(queue.name)
    finally:
        with Connection(rabbitmq_url) as conn:
            conn.default_channel.exchange_delete(exchange.name)
    seen = [_seen(m) for m in got]
    assert seen[:3] == seen[3:] and seen[0]["delivery_info"] == {"exchange": exchange.name, "routing_key": ""}
    assert [p.decode(m.body, routed=False)[0]["i"] for m in got] == [0, 1, 2, 0, 1, 2]


@WIRED
def test_publishes_and_batches_to_several_queues_arrive_in_their_order(rabbitmq_url: str, wired: bool) -> None:
    a, b = _queue(), _queue()
    with _publisher(rabbitmq_url, wired, a, b) as (publisher, count):
        publisher.publish(DEFAULT, a.name, [{"t": p.CAST, "i": 0}])
        publisher.publish_many(DEFAULT, [(a.name, [{"t": p.CAST, "i": 1}, {"t": p.CAST, "i": 2}]),
                                         (b.name, [{"t": p.CAST, "i": 10}]), (a.name, [{"t": p.CAST, "i": 3}])])
        publisher.publish(DEFAULT, b.name, [{"t": p.CAST, "i": 11}])
        publisher.publish_many(DEFAULT, [(a.name, [{"t": p.CAST, "i": 4}]), (b.name, [{"t": p.CAST, "i": 12}])])
        with Connection(rabbitmq_url) as conn:
            assert _ids(conn, a.name, 4) == [0, 1, 2, 3, 4]
            assert _ids(conn, b.name, 3) == [10, 11, 12]
        assert len(count) == (7 if wired else 0)


@WIRED
def test_an_expired_message_is_dropped_by_the_broker(rabbitmq_url: str, wired: bool) -> None:
    queue = _queue()
    with _publisher(rabbitmq_url, wired, queue) as (publisher, count):
        publisher.publish(DEFAULT, queue.name, [{"t": p.CAST, "i": 0}], expiration=0.05)
        publisher.publish(DEFAULT, queue.name, [{"t": p.CAST, "i": 1}])
        publisher.publish(DEFAULT, queue.name, [{"t": p.CAST, "i": 2}], expiration=60.0)
        wait_for(lambda: _depth(rabbitmq_url, queue.name) == 3 or None, 5, 0.01, "the publishes never arrived")
        time.sleep(0.3)  # past the first's expiration: RabbitMQ drops it when it reaches the queue's head
        assert _depth(rabbitmq_url, queue.name) == 2
        with Connection(rabbitmq_url) as conn:
            assert _ids(conn, queue.name, 2) == [1, 2]
        assert len(count) == (3 if wired else 0)


@WIRED
def test_a_signed_publish_is_admitted_by_a_worker_of_the_same_secret(rabbitmq_url: str, wired: bool) -> None:
    queue = _queue()
    msgs = [{"t": p.HEARTBEAT, "i": 1}, {"t": p.CAST, "i": 2}]
    with _publisher(rabbitmq_url, wired, queue, signer=Signer(["s3cret"], "w1@host", 10.0)) as (publisher, count):
        publisher.publish(DEFAULT, queue.name, msgs)
        publisher.publish_many(DEFAULT, [(queue.name, msgs), (queue.name, msgs)])
        with Connection(rabbitmq_url) as conn:
            got = [_get(conn, queue.name) for _ in range(3)]
        assert len(count) == (3 if wired else 0)
    receiver, forger = Signer(["s3cret"], "w2@host", 10.0), Signer(["other"], "w2@host", 10.0)
    for message in got:
        assert [m["i"] for m in receiver.admit(message, p.decode(message.body, routed=False))] == [1, 2]
        assert [m["i"] for m in forger.admit(message, p.decode(message.body, routed=False))] == [2]
    assert [m["i"] for m in receiver.admit(got[0], p.decode(got[0].body, routed=False))] == [2], "a replay was admitted"


@WIRED
@pytest.mark.parametrize("retries", [0, 2], ids=["no retry", "retried"])
def test_a_publish_after_its_connection_was_killed_is_sent_once_on_a_new_one(rabbitmq_url: str, wired: bool,
                                                                              retries: int) -> None:
    """Without retries the publish raises BrokerUnavailable and the next reconnects; with them
    (``ensure``) the publish itself reconnects. Either way what is sent arrives once."""
    queue = _queue()
    with _publisher(rabbitmq_url, wired, queue, retries=retries) as (publisher, count):
        publisher.publish(DEFAULT, queue.name, [{"t": p.CAST, "i": 0}])
        first = publisher._ready().channel
        wait_for(lambda: _depth(rabbitmq_url, queue.name) == 1 or None, 5, 0.01, "the first publish never arrived")
        sock = publisher._conn.connection.transport.sock
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        if retries:
            publisher.publish(DEFAULT, queue.name, [{"t": p.CAST, "i": 1}])
        else:
            with pytest.raises(BrokerUnavailable):
                publisher.publish(DEFAULT, queue.name, [{"t": p.CAST, "i": 1}])
            publisher.declare(queue)  # the publisher forgot its declarations with the connection
        publisher.publish(DEFAULT, queue.name, [{"t": p.CAST, "i": 2}])
        publisher.publish_many(DEFAULT, [(queue.name, [{"t": p.CAST, "i": 3}]), (queue.name, [{"t": p.CAST, "i": 4}])])
        assert publisher._ready().channel is not first
        sent = [0, 1, 2, 3, 4] if retries else [0, 2, 3, 4]
        with Connection(rabbitmq_url) as conn:
            assert _ids(conn, queue.name, len(sent)) == sent
            assert conn.default_channel.basic_get(queue.name, no_ack=True) is None, "a publish arrived twice"
        assert len(count) == (len(sent) if wired else 0)


def test_a_publish_reads_nothing_first_when_the_broker_sent_nothing(rabbitmq_url: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # py-amqp's basic_publish reads first, without waiting (the socket set non-blocking and back: three
    # system calls); the wire peeks (one) and sends what basic_publish sends.
    queue = _queue()
    calls: list[int] = []
    basic_publish = amqp.Channel.basic_publish

    def counted(self: amqp.Channel, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return basic_publish(self, *args, **kwargs)

    monkeypatch.setattr(amqp.Channel, "basic_publish", counted)
    with _publisher(rabbitmq_url, True, queue) as (publisher, count):
        for i in range(5):
            publisher.publish(DEFAULT, queue.name, [{"t": p.CAST, "i": i}])
        publisher.publish_many(DEFAULT, [(queue.name, [{"t": p.CAST, "i": 5}]), (queue.name, [{"t": p.CAST, "i": 6}])])
        assert len(count) == 7 and not calls, "basic_publish read before a publish"
        with Connection(rabbitmq_url) as conn:
            assert _ids(conn, queue.name, 7) == list(range(7))


@WIRED
def test_a_refused_declaration_is_heard_before_the_next_publish(rabbitmq_url: str, wired: bool) -> None:
    # The broker closes the channel of a refused nowait declaration; what it sent waits on the socket
    # and is read before the next publish (py-amqp's basic_publish reads it): the publish is not
    # written to a closed channel, where the broker would drop it.
    queue = _queue()
    with _publisher(rabbitmq_url, wired, queue) as (publisher, _):
        publisher.publish(DEFAULT, queue.name, [{"t": p.CAST, "i": 0}])
        wait_for(lambda: _depth(rabbitmq_url, queue.name) == 1 or None, 5, 0.01, "the first publish never arrived")
        publisher.declare(Queue(queue.name, DEFAULT, routing_key=queue.name, durable=True))  # it is not durable
        sock = publisher._conn.connection.transport.sock
        assert select.select([sock], [], [], 5)[0], "the broker never refused the declaration"
        try:
            publisher.publish(DEFAULT, queue.name, [{"t": p.CAST, "i": 1}])
        except BrokerUnavailable:
            publisher.declare(queue)
            publisher.publish(DEFAULT, queue.name, [{"t": p.CAST, "i": 1}])
        publisher.publish(DEFAULT, queue.name, [{"t": p.CAST, "i": 2}])
        with Connection(rabbitmq_url) as conn:
            assert _ids(conn, queue.name, 3) == [0, 1, 2]


@pytest.mark.parametrize(("body", "headers", "expiration"), [
    (b"x" * 200, {}, "60000"), (b"", {}, None), ("é".encode() * 500, {"forseti-sig": "v1:abc"}, "30000"),
])
def test_the_wire_frames_a_publish_as_py_amqps_frame_writer(body: bytes, headers: dict[str, str],
                                                           expiration: str | None) -> None:
    # The wire writes a publish's frames itself (one write, the method frame and the properties
    # kept): byte for byte py-amqp's, on a channel of another number, the properties of each kind.
    message = amqp_wire._message(p.CONTENT_TYPE, p.CONTENT_ENCODING, headers, 2, expiration, body)
    ours = amqp_wire.frames(3, amqp_wire.method_payload("", "forseti.node.w1@h"), message._serialize_properties(),
                            body)
    assert ours == amqp_wire._py_amqp_frames(3, "", "forseti.node.w1@h", message)


def test_publishes_go_out_in_one_write_each_and_a_body_past_a_frame_through_py_amqp(
        rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A body py-amqp would split across frames (past frame_max) takes its send_method; the rest are
    # written whole, once each, and arrive in order as kombu's producer would have sent them.
    queue = _queue()
    methods: list[int] = []
    send_method = amqp.Channel.send_method

    def counted(self: amqp.Channel, *args: Any, **kwargs: Any) -> Any:
        methods.append(1)
        return send_method(self, *args, **kwargs)

    monkeypatch.setattr(amqp.Channel, "send_method", counted)
    big = "y" * 300_000  # RabbitMQ's frame_max: 128 KiB
    with _publisher(rabbitmq_url, True, queue) as (publisher, count):
        writes: list[int] = []
        transport = publisher._conn.connection.transport
        write = transport.write
        monkeypatch.setattr(transport, "write", lambda data: (writes.append(len(data)), write(data))[1])
        sent_before = publisher._conn.connection.bytes_sent
        methods.clear()  # the declarations'
        publisher.publish(DEFAULT, queue.name, [{"t": p.CAST, "i": 0}])
        publisher.publish(DEFAULT, queue.name, [{"t": p.CAST, "i": 1, "payload": big}], expiration=60.0)
        publisher.publish(DEFAULT, queue.name, [{"t": p.CAST, "i": 2}], expiration=60.0)
        publisher.publish(DEFAULT, queue.name, [{"t": p.CAST, "i": 3}])
        assert len(count) == 4 and len(methods) == 1, "a small publish went through send_method"
        assert len(writes) == 3  # the three others once each (py-amqp's writer holds its own write)
        assert publisher._conn.connection.bytes_sent == sent_before + 4  # what the heartbeat check counts
        with Connection(rabbitmq_url) as conn:
            got = [p.decode(_get(conn, queue.name).body, routed=False)[0] for _ in range(4)]
            conn.default_channel.queue_delete(queue.name)
    assert [m["i"] for m in got] == [0, 1, 2, 3]
    assert got[1]["payload"] == big
