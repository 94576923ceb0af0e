"""Which brokers forseti runs on, and the one module that knows each of them.

:mod:`.amqp` (RabbitMQ) and :mod:`.redis` hold everything that differs between the two: queue
arguments, who picks the leader queue's consumer, message expiry, the Redis pipeline and list
TTLs. Everything else asks :func:`for_connection` (or :func:`named`) for the module of a
connection's transport instead of testing its name. A worker refuses any other transport
(:func:`require`); a client on one publishes and consumes with nothing broker-specific.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

from ..errors import ConfigurationError
from . import amqp, redis, redis_wire

__all__ = ["CONNECTION_ERRORS", "SUPPORTED", "Batch", "Transport", "for_connection", "named", "require", "wire"]


class Batch(Protocol):
    """Publishes made in a :meth:`Transport.batch` block, and what the block adds after each."""

    def keep_at_least(self, routing_key: str, ttl: float) -> None:
        """Raise the TTL of the list of ``routing_key`` to ``ttl`` seconds, unless it lives longer."""


class Transport(Protocol):
    """What forseti needs to know of a broker (the modules :mod:`.amqp` and :mod:`.redis`)."""

    #: kombu's ``driver_type`` of the transport.
    name: str
    #: The broker delivers a queue to one of its consumers (the leader election needs no lease).
    single_active_consumer: bool
    #: Floodable queues are consumed with acks and a prefetch window (see ``ConsumerLoop``).
    prefetch_windows: bool
    #: ``publish_many`` sends its messages in one round trip (a :meth:`batch`).
    pipelines: bool
    #: What the client library raises for a lost connection (besides ``OSError``).
    connection_errors: tuple[type[BaseException], ...]

    def queue_arguments(self, *, single_active_consumer: bool = False,
                        expires: float | None = None) -> dict[str, Any] | None:
        """Arguments declaring a queue consumed by one consumer at a time and/or deleted
        ``expires`` seconds after its last consumer left (``None``: the broker has neither)."""

    def list_ttl(self, keep: float | None, expiration: float | None) -> float | None:
        """Seconds a queue must live at least after a push of a message expiring after
        ``expiration`` to a queue kept ``keep`` seconds (``None``: the broker expires them)."""

    def prepare(self, channel: Any) -> None:
        """Ready a kombu channel that will publish (Redis: one client for all its publishes)."""

    def needs_declaring(self, queue: Any) -> bool:
        """Whether a publisher must declare ``queue`` before publishing to it."""

    def declare(self, channel: Any, queues: Iterable[Any], *, consumer: bool = False) -> None:
        """Declare on ``channel`` what of ``queues`` a publisher (or, ``consumer``, a consumer)
        needs declared: a publish or consume after it on the same channel finds it."""

    def batch(self, channel: Any) -> AbstractContextManager[Batch]:
        """A block whose publishes on ``channel`` go out in order, in one round trip if it can."""


class _Other:
    """A transport forseti does not support: publish and consume with nothing broker-specific."""

    single_active_consumer = prefetch_windows = pipelines = False
    connection_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, name: str) -> None:
        self.name = name

    def queue_arguments(self, *, single_active_consumer: bool = False,
                        expires: float | None = None) -> dict[str, Any] | None:
        return None

    def list_ttl(self, keep: float | None, expiration: float | None) -> float | None:
        return None

    def prepare(self, channel: Any) -> None:
        return None

    def needs_declaring(self, queue: Any) -> bool:
        return True

    def declare(self, channel: Any, queues: Iterable[Any], *, consumer: bool = False) -> None:
        for queue in queues:
            queue.bind(channel).declare()

    def batch(self, channel: Any) -> AbstractContextManager[Batch]:
        return nullcontext(_NoBatch())


class _NoBatch:
    def keep_at_least(self, routing_key: str, ttl: float) -> None:
        return None


_SUPPORTED: dict[str, Transport] = {amqp.name: amqp, redis.name: redis}
#: kombu ``driver_type`` of every transport a worker runs on.
SUPPORTED = tuple(_SUPPORTED)
#: What the client library of any supported transport raises for a lost connection.
CONNECTION_ERRORS = tuple(e for t in _SUPPORTED.values() for e in t.connection_errors)


def named(driver_type: str) -> Transport:
    """The transport of kombu's ``driver_type`` (a plain one when forseti does not support it)."""
    return _SUPPORTED.get(driver_type) or _Other(driver_type)


def for_connection(connection: Any) -> Transport:
    """The transport of a kombu connection (see :func:`named`)."""
    return named(connection.transport.driver_type)


def wire(transport: Transport, channel: Any, content_type: str, content_encoding: str) -> redis_wire.Wire | None:
    """forseti's own writer of the publishes made on kombu ``channel`` with the content type and
    encoding given (:mod:`.redis_wire`), or ``None``: publish through kombu (RabbitMQ, any other
    transport, or the guard off)."""
    return redis_wire.for_channel(channel, content_type, content_encoding) if transport is redis else None


def require(connection: Any) -> Transport:
    """The transport of a kombu connection; raises :class:`ConfigurationError` when a worker
    cannot run on it (no single active consumer, no lease for the leader queue)."""
    transport = for_connection(connection)
    if transport.name not in _SUPPORTED:
        raise ConfigurationError(
            f"forseti_celery needs a RabbitMQ (amqp) or Redis broker; {transport.name!r} has neither a single "
            "active consumer nor a lease for the leader queue")
    return transport
