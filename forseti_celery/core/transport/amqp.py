"""RabbitMQ (kombu's ``amqp`` transport): what forseti does differently there.

The broker does the work Redis needs forseti for: it delivers the leader queue to a single
active consumer (``x-single-active-consumer``), deletes a queue left without consumers
(``x-expires``), drops a message unconsumed past its ``expiration``, and holds a backlog back
behind a consumer's prefetch window. Every declarer of a queue must pass identical arguments
(RabbitMQ answers 406 otherwise): they are built here only.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import amqp.exceptions

__all__ = ["batch", "connection_errors", "declare", "list_ttl", "name", "needs_declaring", "pipelines",
           "prefetch_windows", "prepare", "queue_arguments", "single_active_consumer"]

name = "amqp"
single_active_consumer = True
prefetch_windows = True
#: Publishes are not answered one by one (no publisher confirms): a pipeline would save nothing.
pipelines = False
#: What py-amqp raises for a lost connection or channel (besides ``OSError``).
connection_errors: tuple[type[BaseException], ...] = (amqp.exceptions.ConnectionError,
                                                      amqp.exceptions.ChannelError)


def queue_arguments(*, single_active_consumer: bool = False, expires: float | None = None) -> dict[str, Any] | None:
    """``x-single-active-consumer`` and/or ``x-expires`` (milliseconds)."""
    args: dict[str, Any] = {}
    if single_active_consumer:
        args["x-single-active-consumer"] = True
    if expires is not None:
        args["x-expires"] = int(expires * 1000)
    return args or None


def list_ttl(keep: float | None, expiration: float | None) -> None:
    """None: RabbitMQ expires queues (``x-expires``) and messages (``expiration``) itself."""
    return None


def prepare(channel: Any) -> None:
    """Nothing to prepare."""


def needs_declaring(queue: Any) -> bool:
    """Every queue: RabbitMQ drops what is routed to a queue that does not exist."""
    return True


def declare(channel: Any, queues: Iterable[Any], *, consumer: bool = False) -> None:
    """Declare ``queues`` (and their bindings) on ``channel`` without waiting for each answer
    (``nowait``): RabbitMQ handles a channel's frames in order, so a publish or a ``basic_consume``
    sent after them on the same channel finds them declared, and a refusal closes the channel, which
    that ``basic_consume`` (waiting for its answer) or the publisher's next use reports."""
    for queue in queues:
        bound = queue.bind(channel)
        if bound.no_declare:
            continue
        # What Queue.declare(nowait=True) does, but for the exchanges of its bindings too (which
        # kombu declares waiting for each answer).
        if bound.exchange is not None and bound.exchange.name:
            bound.exchange.declare(nowait=True)
        bound.queue_declare(nowait=True)
        if bound.exchange is not None and bound.exchange.name:
            bound.queue_bind(nowait=True)
        for b in bound.bindings:
            if b.exchange is not None and b.exchange.name:
                b.exchange(channel).declare(nowait=True)
            b.bind(bound, nowait=True, channel=channel)


class _Plain:
    def keep_at_least(self, routing_key: str, ttl: float) -> None:
        return None


def batch(channel: Any) -> AbstractContextManager[_Plain]:
    """Each publish goes out as it is made, in order."""
    return nullcontext(_Plain())
