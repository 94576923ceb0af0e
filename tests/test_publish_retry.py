"""A publish goes once without kombu's retry machinery (``Connection.ensure``, built and run for
every publish, ~60 µs of a client's call: issue 15); a publish that fails on a lost connection is
still retried through it, reconnecting, and arrives once."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue

from forseti_celery.core.broker import Publisher
from forseti_celery.core.protocol import decode
from forseti_celery.testing import wait_for

DEFAULT = Exchange("")


def _received(conn: Connection, queue: Queue, n: int) -> list[Any]:
    got: list[Any] = []

    def more() -> bool:
        message = queue(conn.default_channel).get(no_ack=True)
        if message is not None:
            got.extend(m["i"] for m in decode(message.body, routed=False))
        return len(got) >= n

    wait_for(more, 10, 0.01, lambda: f"got {got}, expected {n} messages")
    return got


def test_a_publish_runs_no_retry_machinery_and_a_lost_connection_is_still_retried(
        broker_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = Celery("publish-retry", broker=broker_url, set_as_current=False)
    queue = Queue(f"forseti-t-retry-{uuid.uuid4().hex[:8]}", DEFAULT, auto_delete=False, durable=False)
    publisher = Publisher(app.connection_for_write())
    ensured: list[Any] = []
    ensure = publisher._conn.ensure

    def counted(*args: Any, **kwargs: Any) -> Any:
        ensured.append(args)
        return ensure(*args, **kwargs)

    monkeypatch.setattr(publisher._conn, "ensure", counted)
    with Connection(broker_url) as conn:
        queue(conn.default_channel).declare()
        try:
            publisher.publish(DEFAULT, queue.name, [{"t": "cast", "i": 0}])
            publisher.publish(DEFAULT, queue.name, [{"t": "cast", "i": 1}])
            assert not ensured  # the usual publish: no kombu retry wrapper built or run
            # Received before the connection breaks: RabbitMQ may drop what a connection published
            # just before an abrupt close (no publisher confirms), kombu's own publish as well.
            assert _received(conn, queue, 2) == [0, 1]
            redis = broker_url.startswith("redis")
            if redis:  # the wire's kept connection, as if the server had closed it: the wire sends again
                publisher._ready().channel._forseti_wire._conn._sock.shutdown(2)
            else:
                publisher._conn.connection.sock.shutdown(2)
            publisher.publish(DEFAULT, queue.name, [{"t": "cast", "i": 2}])
            assert _received(conn, queue, 1) == [2]
            time.sleep(0.2)
            assert queue(conn.default_channel).get(no_ack=True) is None  # sent once
            assert bool(ensured) is not redis  # RabbitMQ: reconnected by kombu's retry
        finally:
            publisher.close()
            queue(conn.default_channel).delete()
