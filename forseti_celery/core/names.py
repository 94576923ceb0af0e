"""Wire names: every queue, exchange, routing key and event type of a namespace.

Key text never appears in a queue name or routing key: queues are named after worker
hostnames, client ids and the namespace only. See ``docs/design.rst`` (Queues and
exchanges).
"""

from __future__ import annotations

import json
from typing import Any

from celery.events.event import get_exchange
from kombu import Exchange, Queue, binding

from .transport import amqp, redis

# -- event types (sent with the worker's hostname; see docs/monitoring.rst) ---------
EVENT_STARTED = "forseti-process-started"
EVENT_EXITED = "forseti-process-exited"
EVENT_LEADER = "forseti-leader-elected"
EVENT_NODE_LOST = "forseti-node-lost"  # the leader freed every key of a worker (field ``node``)
#: The leader restarted a key (its restart policy): ``name``, ``key``, ``node``, ``child_pid``,
#: ``restarts`` and ``reason``, why its previous process ended.
EVENT_RESTARTED = "forseti-process-restarted"
#: The leader gave a key up (more than ``max_restarts`` within ``restart_window``): it stays down.
EVENT_GIVEN_UP = "forseti-process-given-up"
#: A key handed off to another worker (issue 13): ``name``, ``key``, ``source``, ``target`` and
#: ``pause_ms``, from its handoff's start to its next incarnation's start (sent by the target).
EVENT_MOVED = "forseti-process-moved"

#: What a client's cache of refs listens to.
CACHE_EVENTS = (EVENT_EXITED, EVENT_NODE_LOST, EVENT_LEADER)
#: The same as one Redis pub/sub glob (kombu binds a fanout queue on Redis to a single pattern):
#: every ``forseti.*`` routing key but ``forseti.process.started``, ``forseti.process.restarted``,
#: ``forseti.process.given.up`` and ``forseti.process.moved``, which, alone of them, have an ``s``,
#: ``r``, ``g`` or ``m`` for their 17th character. A client then never receives a start event (one
#: per new key), nor a restart's or a move's. ``tests/test_protocol.py`` checks it against every event type.
REDIS_CACHE_EVENTS_PATTERN = "forseti.????????[^srgm]*"


def event_routing_key(event_type: str) -> str:
    """The routing key Celery publishes an event of ``event_type`` with."""
    return event_type.replace("-", ".")


#: Seconds a worker's node queue outlives its last consumer (RabbitMQ's ``x-expires``) or, on
#: Redis, its last push or its worker's last heartbeat (the list's TTL, raised by each).
NODE_QUEUE_EXPIRES = 120.0


def state_key(namespace: str, name: str, key: str) -> str:
    """The Redis key (at ``forseti_state_url``) of the checkpoint of ``(name, key)``: the
    namespace's prefix, then ``[name, key]`` as JSON, so no two pairs share one (issue 13)."""
    return f"{namespace}.state." + json.dumps([name, key], ensure_ascii=False, separators=(",", ":"))


class Names:
    """Queue, exchange and routing names of one namespace (one cluster)."""

    def __init__(self, namespace: str, single_active_consumer: bool) -> None:
        self.namespace = namespace
        # Direct messages go through the default exchange, routed by queue name: on Redis that
        # skips kombu's binding-table lookup, one round trip per publish.
        self.exchange = Exchange("")
        self.bcast_exchange = Exchange(f"{namespace}.bcast", type="fanout", durable=False, auto_delete=False)
        self._transport = amqp if single_active_consumer else redis  # queue arguments: the broker's
        args = self._transport.queue_arguments(single_active_consumer=True)
        #: Routing key (= queue name) of the leader queue.
        self.leader = f"{namespace}.leader"
        self.leader_queue = Queue(
            self.leader, self.exchange, routing_key=self.leader,
            durable=False, auto_delete=False, queue_arguments=args,
        )
        self._amqp = single_active_consumer
        self._node_prefix = self.node_routing_key("")

    def node_routing_key(self, hostname: str) -> str:
        """Routing key (= queue name) of a worker's own queue (a Celery node name, never key text)."""
        return f"{self.namespace}.node.{hostname}"

    def queue_ttl(self, routing_key: str) -> float | None:
        """Redis: seconds the list of ``routing_key`` must live at least after a push to it (a node
        queue's :data:`NODE_QUEUE_EXPIRES`), or ``None`` (RabbitMQ's ``x-expires`` does it there)."""
        return NODE_QUEUE_EXPIRES if routing_key.startswith(self._node_prefix) else None

    def node_queue(self, hostname: str) -> Queue:
        """The queue a worker consumes for spawn orders, casts, calls and stops to its processes."""
        # A dead worker's queue expires instead of collecting messages forever (Redis: queue_ttl).
        args = self._transport.queue_arguments(expires=NODE_QUEUE_EXPIRES)
        return Queue(
            self.node_routing_key(hostname), self.exchange,
            routing_key=self.node_routing_key(hostname),
            durable=False, auto_delete=False, queue_arguments=args,
        )

    def bcast_queue(self, hostname: str, incarnation: str) -> Queue:
        """A worker's subscription to cluster-wide heartbeats (one per incarnation: two workers
        started with one name must each hear everything, to find each other)."""
        return Queue(
            f"{self.namespace}.bcast.{hostname}.{incarnation}", self.bcast_exchange,
            durable=False, auto_delete=True,
        )

    def exits_queue(self, client_id: str, app: Any) -> Queue:
        """A client's subscription to keyed-process exit events (for its cache of refs and routes)."""
        with app.connection_for_read() as conn:
            exchange = get_exchange(conn)  # Celery's event exchange (a fanout on Redis)
        # Redis subscribes a fanout queue to one routing-key pattern only (its last binding).
        keys = [event_routing_key(t) for t in CACHE_EVENTS] if self._amqp else [REDIS_CACHE_EVENTS_PATTERN]
        return Queue(
            f"{self.namespace}.exits.{client_id}",
            bindings=[binding(exchange, routing_key=k) for k in keys],
            durable=False, auto_delete=True, queue_arguments=self._transport.queue_arguments(expires=60),
        )

    def reply_queue(self, client_id: str) -> Queue:
        """A client's private queue for answers."""
        args = self._transport.queue_arguments(expires=60)
        name = f"{self.namespace}.reply.{client_id}"
        return Queue(
            name, self.exchange, routing_key=name,
            durable=False, auto_delete=True, queue_arguments=args,
        )
