"""When nothing answers: a namespace nobody serves, and a broker that goes away for longer than the
retry budget (a TCP relay of our own in front of the real broker, cut and restored by the test: the
shared brokers themselves stay up for everyone else)."""

from __future__ import annotations

import uuid

import pytest
import redis
from celery import Celery
from kombu import Connection

from forseti_celery import Forseti, ForsetiTimeout
from forseti_celery.protocol import Names
from forseti_celery.testing import wait_for


def _leader_queue_length(broker_url: str, names: Names) -> int:
    """Messages waiting in the leader queue (0 once it is gone)."""
    if broker_url.startswith("redis"):
        with redis.Redis.from_url(broker_url) as r:
            return int(r.llen(names.leader))
    with Connection(broker_url) as conn, conn.channel() as channel:
        try:
            return int(channel.queue_declare(names.leader, passive=True).message_count)
        except conn.channel_errors:
            return 0


def _delete_leader_queue(broker_url: str, names: Names) -> None:
    if broker_url.startswith("redis"):
        with redis.Redis.from_url(broker_url) as r:
            r.delete(names.leader)
        return
    with Connection(broker_url) as conn, conn.channel() as channel:
        channel.queue_delete(names.leader)


def test_requests_nobody_answers_leave_the_leader_queue_with_their_deadline(broker_url: str) -> None:
    # A namespace without workers: get_key times out naming what it asked, and neither the first
    # request nor those re-sent every forseti_retry_interval stay in the leader queue after it.
    namespace = f"forseti-ghost-{uuid.uuid4().hex[:8]}"
    app = Celery("ghost", broker=broker_url, set_as_current=False)
    forseti = Forseti(app, namespace=namespace, retry_interval=0.3)
    try:
        with pytest.raises(ForsetiTimeout) as caught:
            forseti.get_key("k", timeout=1.5)
        message = str(caught.value)
        print(f"\n{message}")
        broker = Connection(broker_url).as_uri()
        assert "no leader answered" in message and repr(namespace) in message and broker in message
        assert "guest:guest" not in message
        wait_for(lambda: _leader_queue_length(broker_url, forseti.names) == 0, 10, 0.1,
                 lambda: f"{_leader_queue_length(broker_url, forseti.names)} requests still in the leader queue")
    finally:
        forseti.close()
        _delete_leader_queue(broker_url, forseti.names)
