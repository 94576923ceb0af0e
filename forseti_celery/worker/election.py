"""Who leads: RabbitMQ's single active consumer, or a renewed lease on Redis.

* RabbitMQ: every worker consumes the leader queue, declared with
  ``x-single-active-consumer``; the broker delivers to one of them only. A worker
  learns that it leads when the first message reaches it (workers ping the
  leader queue every heartbeat, so this happens within one heartbeat), and stops
  leading when its connection drops.
* Redis: several consumers of one list would compete, so a worker consumes the
  leader queue only while it holds a lease: a redis-py ``Lock`` on
  ``<namespace>:leader`` acquired without blocking, extended every quarter lease and
  released on a warm shutdown so another worker takes over at once. Each acquisition
  takes a fencing token, ``INCR <namespace>:leader:epoch``, and records ``"<token> <hostname>"``
  in ``<namespace>:leader:holder``: the term's epoch, which any worker can check (:meth:`Election.holder`).

An epoch that a message claims counts only when the election backs it: on Redis the holder key says
who leads with which token; on RabbitMQ only the active consumer of the leader queue hears the
workers' pings, and its answers (to a nonce it alone has seen) are what the workers believe.
"""

from __future__ import annotations

import time
from typing import Any

import redis.exceptions
from celery.utils.log import get_logger
from kombu import Connection

from ..core import compat, transport

logger = get_logger(__name__)

__all__ = ["Election", "RedisLease", "SingleActiveConsumer", "election_for"]


#: A new term: the next fencing token, and who holds it (KEYS: counter, holder; ARGV: hostname).
_NEW_TERM = """
local epoch = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], epoch .. ' ' .. ARGV[1])
return epoch
"""


class Election:
    """How a worker learns that it holds the leader role."""

    #: True when the leader queue is consumed by every worker (the broker picks one).
    always_consume = True

    #: The fencing token of the term this worker holds (Redis), else None.
    token: int | None = None

    def poll(self) -> bool | None:
        """Acquire or renew; True/False when the role is decided here, None when by the broker."""
        return None

    def holder(self) -> tuple[int, str] | None:
        """``(epoch, hostname)`` of the latest term the election granted, read now; None when it
        cannot be read here (RabbitMQ: the broker's choice is not visible; Redis unreachable)."""
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

    def __init__(self, connection: Connection, key: str, lease: float, hostname: str) -> None:
        self._conn = connection
        self._key = key
        self._lease = lease
        self._hostname = hostname
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
            if compat.redis_lock_held(lock):
                now = time.monotonic()
                if now < self._renew_at:
                    return True  # renewed less than a quarter lease ago
                try:
                    lock.extend(self._lease, replace_ttl=True)
                    self._renew_at = now + self._lease / 4
                    return True
                except redis.exceptions.LockError:
                    compat.redis_lock_forget(lock)
                    self.token = None
                    logger.warning("forseti: leader lease %s was lost", self._key)
                    return False
            if not lock.acquire(blocking=False):
                return False
            self.token = int(lock.redis.eval(_NEW_TERM, 2, f"{self._key}:epoch", f"{self._key}:holder",
                                             self._hostname))
            return True
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.warning("forseti: lease %s unreachable: %r", self._key, exc)
            self._reset()
            return False

    def holder(self) -> tuple[int, str] | None:
        try:
            value = self._conn.default_channel.client.get(f"{self._key}:holder")
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.warning("forseti: lease %s unreachable: %r", self._key, exc)
            return None
        if value is None:
            return 0, ""
        epoch, _, hostname = (value.decode() if isinstance(value, bytes) else value).partition(" ")
        return int(epoch), hostname

    def release(self) -> None:
        if self._lock is not None and compat.redis_lock_held(self._lock):
            self.token = None
            try:
                self._lock.release()
            except (redis.exceptions.RedisError, OSError):
                pass

    def _reset(self) -> None:
        self.token = None
        if self._lock is not None:
            compat.redis_lock_forget(self._lock)
        self._lock = None
        try:
            self._conn.collect()
        except Exception:
            pass

    def close(self) -> None:
        self._conn.release()


def election_for(driver_type: str, connection: Connection, key: str, lease: float, hostname: str) -> Election:
    """The election matching the broker's transport."""
    if not transport.named(driver_type).single_active_consumer:
        return RedisLease(connection, key, lease, hostname)
    return SingleActiveConsumer()
