"""The events thread sends what comes within its linger as one broker message (a list of
events, Celery's buffered group), each event intact and in order, and close() sends what is queued."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from forseti_celery.core import protocol as p
from forseti_celery.testing import wait_for
from forseti_celery.worker.events import EventSender

from .helpers import client_app


@contextmanager
def receiving(app: Any, host: str) -> Iterator[tuple[list[dict[str, Any]], list[tuple[str, int]]]]:
    """Celery's own EventReceiver on the real broker: the events it gives, in order, and each broker
    message's routing key and how many events it held (``_receive`` is called once a message)."""
    events: list[dict[str, Any]] = []
    messages: list[tuple[str, int]] = []
    with app.connection_for_read() as conn:
        recv = app.events.Receiver(conn, handlers={"*": events.append})
        receive = recv._receive

        def counted(body: Any, message: Any) -> None:
            held = body if isinstance(body, list) else [body]
            if any(e.get("hostname") == host for e in held):  # (other tests' events on the broker left out)
                messages.append((message.delivery_info.get("routing_key"), len(held)))
            receive(body, message)

        recv._receive = counted
        consumer_ready = threading.Event()
        recv.on_consume_ready = lambda *a, **kw: consumer_ready.set()
        thread = threading.Thread(target=recv.capture, kwargs={"wakeup": False}, daemon=True)
        thread.start()
        assert consumer_ready.wait(10), "the receiver never consumed"
        time.sleep(0.2)  # (Redis: the subscription is made just after)
        try:
            yield events, messages
        finally:
            recv.should_stop = True
            thread.join(5)


def mine(events: list[dict[str, Any]], host: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("hostname") == host]


def test_events_sent_quickly_go_out_together_in_order(broker_url: str) -> None:
    namespace = f"evb{uuid.uuid4().hex[:8]}"
    app = client_app(broker_url, namespace)
    host = f"evb-{uuid.uuid4().hex[:8]}"
    n = 30
    with receiving(app, host) as (events, messages):
        sender = EventSender(app, host, namespace, linger=0.2)
        stamps = []
        for i in range(n):
            sender.send(p.EVENT_STARTED, key=f"k{i}", name="n")
            stamps.append(time.time())
        wait_for(lambda: len(mine(events, host)) >= n, 10, message="not every event arrived")
        sender.close()
        got = mine(events, host)
        assert [e["key"] for e in got] == [f"k{i}" for i in range(n)]  # each once, in order
        assert all(e["type"] == p.EVENT_STARTED and e["namespace"] == namespace for e in got)
        # Each keeps the time of its fact (set at send), not of the batch's publish.
        assert all(e["timestamp"] <= s + 0.05 for e, s in zip(got, stamps, strict=True))
        assert len(messages) < n, messages  # fewer broker messages than events
        assert max(count for _, count in messages) > 1


def test_cache_events_keep_their_routing_key_after_the_batch_before_them(broker_url: str) -> None:
    namespace = f"evb{uuid.uuid4().hex[:8]}"
    app = client_app(broker_url, namespace)
    host = f"evb-{uuid.uuid4().hex[:8]}"
    with receiving(app, host) as (events, messages):
        sender = EventSender(app, host, namespace, linger=0.2)
        sender.send(p.EVENT_STARTED, key="a", name="n")
        sender.send(p.EVENT_EXITED, key="a", name="n")  # a client's cache binds its routing key
        sender.send(p.EVENT_STARTED, key="b", name="n")
        wait_for(lambda: len(mine(events, host)) >= 3, 10, message="not every event arrived")
        sender.close()
        assert [(e["type"], e["key"]) for e in mine(events, host)] == [
            (p.EVENT_STARTED, "a"), (p.EVENT_EXITED, "a"), (p.EVENT_STARTED, "b")]
        # The exit went out as a message of its own, on its own routing key (what a client's cache binds).
        assert messages == [("forseti.multi", 1), ("forseti.process.exited", 1), ("forseti.multi", 1)], messages


def test_close_sends_what_is_queued_in_order(broker_url: str) -> None:
    namespace = f"evb{uuid.uuid4().hex[:8]}"
    app = client_app(broker_url, namespace)
    host = f"evb-{uuid.uuid4().hex[:8]}"
    with receiving(app, host) as (events, _):
        sender = EventSender(app, host, namespace, linger=30.0)  # only close() cuts it short
        for i in range(5):
            sender.send(p.EVENT_STARTED, key=f"k{i}", name="n")
        began = time.monotonic()
        sender.close(timeout=5)
        assert time.monotonic() - began < 5
        wait_for(lambda: len(mine(events, host)) >= 5, 10, message="close() did not send what was queued")
        assert [e["key"] for e in mine(events, host)] == [f"k{i}" for i in range(5)]


def test_an_event_a_clients_cache_listens_to_does_not_wait_for_the_linger(broker_url: str) -> None:
    namespace = f"evb{uuid.uuid4().hex[:8]}"
    app = client_app(broker_url, namespace)
    host = f"evb-{uuid.uuid4().hex[:8]}"
    with receiving(app, host) as (events, _):
        sender = EventSender(app, host, namespace, linger=30.0)
        sender.send(p.EVENT_STARTED, key="a", name="n")
        sender.send(p.EVENT_EXITED, key="a", name="n")  # sends what is queued with it
        wait_for(lambda: len(mine(events, host)) >= 2, 10, message="the exit waited for the linger")
        assert [(e["type"], e["key"]) for e in mine(events, host)] == [(p.EVENT_STARTED, "a"), (p.EVENT_EXITED, "a")]
        sender.close()
