"""Who leads: RabbitMQ's single active consumer, or a renewed lease on Redis.

* RabbitMQ: every worker consumes the leader queue, declared with
  ``x-single-active-consumer``; the broker delivers to one of them only. A worker
  learns that it leads when the first message reaches it (workers ping the
  leader queue every heartbeat, so this happens within one heartbeat), and stops
  leading when its connection drops.
* Redis: several consumers of one list would compete, so a worker consumes the
  leader queue only while it holds a lease: a redis-py ``Lock`` on
  ``<namespace>:leader`` acquired without blocking, extended every quarter lease and
  released on a warm shutdown so another worker takes over at once.
"""

from __future__ import annotations

import time
from typing import Any

import redis.exceptions
from celery.utils.log import get_logger
from kombu import Connection

logger = get_logger(__name__)

__all__ = ["Election", "RedisLease", "SingleActiveConsumer", "election_for"]


class Election:
    """How a worker learns that it holds the leader role."""

    #: True when the leader queue is consumed by every worker (the broker picks one).
    always_consume = True

    def poll(self) -> bool | None:
        """Acquire or renew; True/False when the role is decided here, None when by the broker."""
        return None

    def release(self) -> None:
        """Give the role up now (warm shutdown)."""

    def close(self) -> None:
        """Release resources."""


class SingleActiveConsumer(Election):
    """RabbitMQ: the broker's single active consumer decides."""


class RedisLease(Election):
    """Redis: hold a lease of ``lease`` seconds, renewed every quarter lease."""

    always_consume = False

    def __init__(self, connection: Connection, key: str, lease: float) -> None:
        self._conn = connection
        self._key = key
        self._lease = lease
        self._lock: Any = None
        self._renew_at = 0.0

    def _get_lock(self) -> Any:
        if self._lock is None:
            client = self._conn.default_channel.client
            self._lock = client.lock(self._key, timeout=self._lease, blocking=False, thread_local=False)
        return self._lock

    def poll(self) -> bool:
        try:
            lock = self._get_lock()
            if lock.local.token is not None:
                now = time.monotonic()
                if now < self._renew_at:
                    return True  # renewed less than a quarter lease ago
                try:
                    lock.extend(self._lease, replace_ttl=True)
                    self._renew_at = now + self._lease / 4
                    return True
                except redis.exceptions.LockError:
                    lock.local.token = None
                    logger.warning("forseti: leader lease %s was lost", self._key)
                    return False
            return bool(lock.acquire(blocking=False))
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.warning("forseti: lease %s unreachable: %r", self._key, exc)
            self._reset()
            return False

    def release(self) -> None:
        if self._lock is not None and self._lock.local.token is not None:
            try:
                self._lock.release()
            except (redis.exceptions.RedisError, OSError):
                pass

    def _reset(self) -> None:
        if self._lock is not None:
            self._lock.local.token = None
        self._lock = None
        try:
            self._conn.collect()
        except Exception:
            pass

    def close(self) -> None:
        self._conn.release()


def election_for(driver_type: str, connection: Connection, key: str, lease: float) -> Election:
    """The election matching the broker's transport."""
    if driver_type == "redis":
        return RedisLease(connection, key, lease)
    return SingleActiveConsumer()
