"""The wire: which events a client's cache subscribes to, checked on the real brokers' routing."""

from __future__ import annotations

import time

import redis

from forseti_celery.core import protocol as p

ALL_EVENTS = [getattr(p, name) for name in dir(p) if name.startswith("EVENT_")]


def test_every_event_type_is_listed_here() -> None:
    assert sorted(ALL_EVENTS) == sorted(
        ["forseti-process-started", "forseti-process-exited", "forseti-leader-elected", "forseti-node-lost",
         "forseti-process-restarted", "forseti-process-given-up", "forseti-process-moved"])


def test_the_redis_pattern_of_a_clients_cache_matches_its_events_and_no_start(redis_url: str) -> None:
    """Redis itself matches the pattern (PSUBSCRIBE), as kombu subscribes a client's exits queue."""
    channel = f"/9.celeryev-{time.monotonic_ns()}/"
    with redis.Redis.from_url(redis_url) as r:
        sub = r.pubsub(ignore_subscribe_messages=True)
        sub.psubscribe(channel + p.REDIS_CACHE_EVENTS_PATTERN)
        sub.get_message(timeout=1.0)  # the subscription's confirmation
        for event_type in ALL_EVENTS:
            r.publish(channel + p.event_routing_key(event_type), event_type)
        r.publish(channel + p.event_routing_key(p.EVENT_EXITED), "last")
        heard = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (not heard or heard[-1] != "last"):
            msg = sub.get_message(timeout=0.5)
            if msg is not None:
                heard.append(msg["data"].decode())
        sub.close()
    assert heard[:-1] == [t for t in ALL_EVENTS if t in p.CACHE_EVENTS]
    assert p.EVENT_STARTED not in heard
