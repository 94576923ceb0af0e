"""What a worker's node sends: the messages its consumer thread produces while handling a batch
or a tick, collected per queue and published as one broker message each (:meth:`Sender.flush`),
and the signed publisher they go through.

Threads: ``_out`` belongs to the ``forseti-node`` consumer thread (the only one that adds to it or
flushes it). :meth:`Sender.publish_many` is called by the pool's ``forseti-children`` watcher
thread, and :meth:`Sender.broadcast` by the consumer thread and, once it has stopped, by the
worker's main thread: both go straight to the publisher, which serialises its own use.
"""

from __future__ import annotations

from typing import Any

from celery.utils.log import get_logger
from kombu import Queue

from ..core import protocol as p
from ..core.broker import Publisher
from ..core.errors import BrokerUnavailable
from ..core.signing import Signer

logger = get_logger(__name__)

__all__ = ["Sender"]


class Sender:
    """A worker's sends: per-queue batches of the consumer thread, and the publisher under them."""

    def __init__(self, connection: Any, names: p.Names, signer: Signer | None) -> None:
        self.names = names
        self.publisher = Publisher(connection, keep=self._queue_ttl, signer=signer)
        self._out: dict[str, list[dict[str, Any]]] = {}  # routing key -> messages, in order

    def to_queue(self, routing_key: str, msg: dict[str, Any]) -> None:
        """Send ``msg`` to ``routing_key`` with the batch being handled (see :meth:`flush`)."""
        self._out.setdefault(routing_key, []).append(msg)

    def to_node(self, hostname: str, msg: dict[str, Any]) -> None:
        """Send ``msg`` to another worker's node queue with the batch being handled."""
        self.to_queue(self.names.node_routing_key(hostname), msg)

    def forward(self, msgs: list[dict[str, Any]]) -> None:
        """Put leader messages back on the leader queue, for whoever leads (not us, any more)."""
        if msgs:
            self._out.setdefault(self.names.leader, []).extend(msgs)

    def flush(self) -> None:
        """Publish what handling a batch (or a tick) produced: one broker message per queue."""
        out, self._out = self._out, {}
        for routing_key, msgs in out.items():
            try:
                self.publisher.publish(self.names.exchange, routing_key, msgs, declare=self._declare(routing_key))
            except BrokerUnavailable as exc:
                logger.warning("forseti: %d messages to %s lost: %s", len(msgs), routing_key, exc)

    def publish_many(self, batches: list[tuple[str, list[dict[str, Any]]]]) -> None:
        """Publish ``(routing key, messages)`` batches in order (the pool's reports and answers)."""
        self.publisher.publish_many(self.names.exchange, batches, self._declare)

    def broadcast(self, msg: dict[str, Any]) -> None:
        """Send ``msg`` to every worker (heartbeats, goodbyes); lost if the broker is away."""
        try:
            self.publisher.publish(self.names.bcast_exchange, "", [msg])
        except BrokerUnavailable:
            pass

    def beat(self, hb: dict[str, Any], node_queue: str, ping: dict[str, Any] | None, ping_ttl: float) -> None:
        """Send the heartbeat ``hb`` to every worker, keep ``node_queue`` alive (Redis: our queue
        outlives any backlog we drain, as each push makes it outlive us) and, on RabbitMQ, send
        ``ping`` to the leader queue (expiring after ``ping_ttl`` seconds: it lets the single active consumer
        learn that it leads, even when no client asks anything); lost if the broker is away."""
        self.broadcast(hb)
        try:
            self.publisher.keep_alive(node_queue)
        except BrokerUnavailable:
            pass
        if ping is not None:
            try:
                self.publisher.publish(self.names.exchange, self.names.leader, [ping], expiration=ping_ttl)
            except BrokerUnavailable:
                pass

    def close(self) -> None:
        self.publisher.close()

    def _queue_ttl(self, routing_key: str) -> float | None:
        """Redis: a node queue's TTL (:meth:`~forseti_celery.core.protocol.Names.queue_ttl`), and as much
        for the leader queue, whose list a client's push keeps only until its own deadline (worker
        reports must outlive a short-deadline request pushed before them)."""
        return p.NODE_QUEUE_EXPIRES if routing_key == self.names.leader else self.names.queue_ttl(routing_key)

    def _declare(self, routing_key: str) -> list[Queue]:
        return [self.names.leader_queue] if routing_key == self.names.leader else []
