"""Redis (kombu's ``redis`` transport): what forseti does differently there.

Redis has no queue arguments: a list is consumed by whoever pops it (the leader queue is
consumed only under a lease, see :mod:`forseti_celery.worker.election`), and has no
per-message TTL. What RabbitMQ's ``x-expires`` and ``expiration`` do is done here by the
publisher: after a push, the list's TTL is raised to the least it must live (:func:`list_ttl`),
never lowered. A publish to a list or a fanout exchange is written by :mod:`.redis_wire`, the
envelope kombu would push and the TTL raise in one round trip; any other, or all of them when
kombu is not the version mirrored, goes through kombu's own code, made faster by
:func:`~forseti_celery.core.compat.reuse_redis_client` and sent several in one round trip by
:func:`batch` (all guarded: see :mod:`forseti_celery.core.compat` and :mod:`.redis_wire`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import redis
import redis.exceptions
import redis.utils

from .. import compat
from .redis_wire import KEEP_AT_LEAST, ttl_ms

__all__ = ["KEEP_AT_LEAST", "REDIS_LIB_VERSION", "batch", "connection_errors", "declare", "list_ttl", "name",
           "needs_declaring", "pipelines", "prefetch_windows", "prepare", "queue_arguments", "single_active_consumer",
           "use_package_version"]

name = "redis"
#: Several consumers of one list compete: the leader queue needs a lease.
single_active_consumer = False
#: kombu fetches a list's messages one BRPOP at a time, and a fanout comes on a connection of its own.
prefetch_windows = False
pipelines = True
#: What redis-py raises for a lost or unanswered connection (besides ``OSError``).
connection_errors: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError,
                                                      redis.exceptions.TimeoutError)

def queue_arguments(*, single_active_consumer: bool = False, expires: float | None = None) -> None:
    """None: a queue with ``x-expires`` would make kombu expire the list on its own (and open a
    pipeline per publish); the publisher keeps lists alive instead (:func:`list_ttl`)."""
    return None


def list_ttl(keep: float | None, expiration: float | None) -> float | None:
    """The least TTL a list must have after a push: ``keep`` (its queue's own) or the message's
    ``expiration``, whichever is longer (``None``: neither, no TTL)."""
    return keep if expiration is None else expiration if keep is None else max(keep, expiration)


def needs_declaring(queue: Any) -> bool:
    """Whether a publisher must declare ``queue`` before pushing to it: only a queue bound to a
    named exchange other than a fanout; a list of the default exchange needs none (guarded: see
    :func:`~forseti_celery.core.compat.redis_declare_needed`)."""
    return compat.redis_declare_needed(queue, consumer=False)


def declare(channel: Any, queues: Iterable[Any], *, consumer: bool = False) -> None:
    """Declare on ``channel`` what of ``queues`` a publisher (or, ``consumer``, a consumer) needs
    declared (:func:`~forseti_celery.core.compat.redis_declare_needed`): a consumer's fanout
    subscriptions, nothing else."""
    with compat.redis_declaring_on_channel_client(channel):  # before a consumer reads: no second connection
        for queue in queues:
            if compat.redis_declare_needed(queue, consumer):
                queue.bind(channel).declare()


def prepare(channel: Any) -> None:
    """One redis-py client for every publish of ``channel`` (kombu builds one per publish)."""
    compat.reuse_redis_client(channel)


class Batch:
    """The publishes of a :func:`batch` block, and the TTLs raised after them, in order."""

    def __init__(self, channel: Any, pipe: Any | None) -> None:
        self._channel = channel
        self._pipe = pipe

    def keep_at_least(self, routing_key: str, ttl: float) -> None:
        """Raise the TTL of the list of ``routing_key`` to ``ttl`` seconds unless it lives longer."""
        # The default exchange routes by queue name: the routing key is the list's key.
        client = self._channel.client if self._pipe is None else self._pipe
        client.eval(KEEP_AT_LEAST, 1, self._channel.global_keyprefix + routing_key, ttl_ms(ttl))


@contextlib.contextmanager
def batch(channel: Any) -> Iterator[Batch]:
    """kombu's publishes on ``channel`` in this block, and the TTLs raised, go out in one round
    trip; or, when kombu's internals are not the ones known (compat), each as it is made."""
    with compat.redis_publish_pipeline(channel) as pipe:
        yield Batch(channel, pipe)


def _check_lib_version() -> str | None:
    return (compat._version_in("redis-py", tuple(redis.VERSION), (5, 0), (9, 0))
            or compat._missing(redis.utils, "get_lib_version")
            or (None if isinstance(getattr(redis, "__version__", None), str) else "redis.__version__ is not a string"))


#: redis-py 8 looks its own version up in the installed packages' metadata (``importlib.metadata``:
#: 0.3-1.7 ms) for every connection it makes, to name itself (``CLIENT SETINFO``); a new client's
#: first request makes three. Its ``__version__`` says the same.
REDIS_LIB_VERSION = compat.Guard("redis-py's version lookup", "redis-py reads its version from the package "
                                 "metadata for each connection (slower connections)", _check_lib_version)


def _lib_version() -> str:
    return str(redis.__version__)


def use_package_version() -> None:
    """Have redis-py name its version from ``redis.__version__`` instead of looking it up in the
    package metadata for each connection (guarded: :data:`REDIS_LIB_VERSION`). Done on import."""
    if REDIS_LIB_VERSION.ok():
        redis.utils.get_lib_version = _lib_version


use_package_version()
