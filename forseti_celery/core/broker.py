"""Publishing, shared by clients and workers: a thread-safe publisher, the batcher of a client's
sends, and the restart intensity of the threads that use them (the consumer thread is
:mod:`~forseti_celery.core.consumer`; what differs per broker, :mod:`~forseti_celery.core.transport`).

The publisher opens a connection of its own from the Celery app's broker settings, so forseti
traffic never shares (or blocks) Celery's consumer connection, and a task blocked on ``get_key``
in a solo worker cannot stall the leader or the registry living in the same process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from celery.utils.log import get_logger
from kombu import Connection, Exchange, Producer, Queue
from kombu.exceptions import OperationalError

from . import transport
from .errors import BrokerUnavailable
from .protocol import CONTENT_ENCODING, CONTENT_TYPE, Encoded, Message, encode
from .transport import amqp_wire

if TYPE_CHECKING:
    from .signing import Signer

logger = get_logger(__name__)

__all__ = ["Batcher", "Publisher", "RestartIntensity"]


class RestartIntensity:
    """Erlang supervisor's restart intensity: more than ``max_retries`` failures
    within ``max_time`` seconds means give up instead of looping."""

    def __init__(self, max_retries: int, max_time: float) -> None:
        self.max_retries = max_retries
        self.max_time = max_time
        self._failures: deque[float] = deque()

    def failed(self) -> bool:
        """Record a failure; return True while restarting is still allowed."""
        now = time.monotonic()
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.max_time:
            self._failures.popleft()
        return len(self._failures) <= self.max_retries


class Publisher:
    """Publishes message batches on a connection of its own; safe from any thread."""

    def __init__(self, connection: Connection, retries: int = 2,
                 keep: Callable[[str], float | None] = lambda routing_key: None,
                 signer: Signer | None = None) -> None:
        """``keep(routing_key)``: on Redis, seconds the list of a queue must live at least after
        each push to it (what ``x-expires`` does on RabbitMQ), or ``None``: no TTL. ``signer``: a
        worker's, which signs every broker message it publishes (see :mod:`forseti_celery.core.signing`)."""
        self._conn = connection
        self._transport = transport.for_connection(connection)
        self._signer = signer
        self._keep = keep
        self._lock = threading.Lock()
        self._producer: Producer | None = None
        self._retries = retries
        self._declared: set[str] = set()

    def publish(
        self,
        exchange: Exchange,
        routing_key: str,
        messages: Sequence[Message | Encoded],
        *,
        declare: Iterable[Queue] = (),
        expiration: float | None = None,
    ) -> None:
        """Send ``messages`` as one broker message; raises :class:`BrokerUnavailable`.

        Unconsumed after ``expiration`` seconds, the message is dropped: RabbitMQ expires it
        (per-message TTL); a Redis list has no per-message TTL, so the queue's list is kept at
        least that long and no longer than its latest expiring message (a TTL only ever raised).
        """
        body = encode(messages)  # outside the lock: a large body holds up no other thread's publish
        with self._guard():
            producer = self._ready()
            try:
                # Once without kombu's retries around it: Connection.ensure builds and runs them for
                # every publish (~60 µs of a client's call, issue 15). A lost connection retries below.
                self._publish_one(producer, exchange, routing_key, body, declare, expiration)
                return
            except (*self._conn.recoverable_connection_errors, *self._conn.recoverable_channel_errors) as exc:
                logger.debug("forseti: a publish failed (%r); retrying", exc)
            publish = self._conn.ensure(
                producer, self._publish_one,
                max_retries=self._retries, interval_start=0.1, interval_step=0.2, interval_max=0.3,
            )
            publish(producer, exchange, routing_key, body, declare, expiration)

    def _publish_one(self, producer: Producer, exchange: Exchange, routing_key: str, body: bytes,
                     declare: Iterable[Queue], expiration: float | None) -> None:
        ttl = self._transport.list_ttl(self._keep(routing_key), expiration)
        wire = self._wire(producer)
        queues = list(declare)
        if wire is not None and self._routes(wire, exchange, routing_key, queues):
            # Redis: ttl is None only without an expiration (the list's TTL expires the message)
            wire.send(self._commands(wire, exchange, routing_key, body, queues, ttl))
            return
        if ttl is None:
            fast = self._amqp_wire(producer)
            if fast is not None and self._routes(fast, exchange, routing_key, queues):
                # RabbitMQ: what kombu's Producer sends, handed to py-amqp's basic_publish
                fast.publish(exchange, routing_key, body, self._headers(exchange, routing_key, body), expiration)
                return
            self._put(producer.publish, exchange, routing_key, body, queues, expiration)
            return
        with self._transport.batch(producer.channel) as batch:
            self._put(producer.publish, exchange, routing_key, body, queues, None)
            batch.keep_at_least(routing_key, ttl)

    def keep_alive(self, routing_key: str) -> None:
        """Redis: raise the TTL of the list of ``routing_key``, if it exists, to ``keep(routing_key)``
        (its consumer's own queue then outlives any backlog it drains); raises :class:`BrokerUnavailable`."""
        ttl = self._transport.list_ttl(self._keep(routing_key), None)
        if ttl is None:
            return
        with self._guard():
            if (wire := self._wire(self._ready())) is not None:
                wire.send([wire.keep_at_least(routing_key, ttl)])
                return
            with self._transport.batch(self._ready().channel) as batch:
                batch.keep_at_least(routing_key, ttl)

    def publish_many(
        self,
        exchange: Exchange,
        batches: Sequence[tuple[str, Sequence[Message | Encoded]]],
        declare: Callable[[str], Iterable[Queue]] = lambda routing_key: (),
    ) -> None:
        """Send each ``(routing_key, messages)`` as one broker message, in this order; on Redis all
        of them in one round trip (a pipeline). Raises :class:`BrokerUnavailable`: then any of
        them may have been sent or not."""
        if len(batches) < 2 or not self._transport.pipelines:
            for routing_key, messages in batches:
                self.publish(exchange, routing_key, messages, declare=declare(routing_key))
            return
        bodies = [(routing_key, encode(messages), list(declare(routing_key))) for routing_key, messages in batches]
        with self._guard():
            producer = self._ready()
            wire = self._wire(producer)
            if wire is not None and all(self._routes(wire, exchange, rk, queues) for rk, _, queues in bodies):
                list_ttl = self._transport.list_ttl
                wire.send([command for routing_key, body, queues in bodies for command in self._commands(
                    wire, exchange, routing_key, body, queues, list_ttl(self._keep(routing_key), None))])
                return
            with self._transport.batch(producer.channel) as batch:
                for routing_key, body, queues in bodies:
                    self._put(producer.publish, exchange, routing_key, body, queues, None)
                    if (ttl := self._transport.list_ttl(self._keep(routing_key), None)) is not None:
                        batch.keep_at_least(routing_key, ttl)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        with self._lock:
            try:
                yield
            except (OSError, OperationalError, *self._conn.connection_errors, *self._conn.channel_errors) as exc:
                self._reset()
                raise BrokerUnavailable(f"broker unreachable: {exc!r}") from exc

    def _ready(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(self._channel())
        return self._producer

    def _wire(self, producer: Producer) -> transport.redis_wire.Wire | None:
        return transport.wire(self._transport, producer.channel, CONTENT_TYPE, CONTENT_ENCODING)

    def _amqp_wire(self, producer: Producer) -> amqp_wire.Wire | None:
        if self._transport is not transport.amqp:
            return None
        return amqp_wire.for_channel(producer.channel, CONTENT_TYPE, CONTENT_ENCODING)

    def _routes(self, wire: transport.redis_wire.Wire | amqp_wire.Wire, exchange: Exchange, routing_key: str,
                declare: list[Queue]) -> bool:
        """Whether ``wire`` sends this publish: one kombu would send as it does, no queue to declare."""
        return wire.routes(exchange, routing_key) and not any(
            self._transport.needs_declaring(q) for q in declare if q.name not in self._declared)

    def _commands(self, wire: transport.redis_wire.Wire, exchange: Exchange, routing_key: str, body: bytes,
                  declare: list[Queue], ttl: float | None) -> list[tuple[Any, ...]]:
        """What ``wire`` sends for a publish of ``body`` (:meth:`_routes`), its list's TTL raise after it."""
        commands = wire.push(exchange, routing_key, body, self._headers(exchange, routing_key, body))
        if ttl is not None:
            commands.append(wire.keep_at_least(routing_key, ttl))
        self._declared.update(q.name for q in declare)
        return commands

    def _headers(self, exchange: Exchange, routing_key: str, body: bytes) -> dict[str, str] | None:
        return None if self._signer is None else self._signer.headers(exchange.name, routing_key, body)

    def _put(self, publish: Callable[..., Any], exchange: Exchange, routing_key: str, body: bytes,
             declare: Iterable[Queue], expiration: float | None) -> None:
        to_declare = [q for q in declare if q.name not in self._declared]
        publish(
            body, exchange=exchange, routing_key=routing_key,
            content_type=CONTENT_TYPE, content_encoding=CONTENT_ENCODING,
            declare=[exchange, *(q for q in to_declare if self._transport.needs_declaring(q))],
            expiration=expiration, retry=False,
            headers=self._headers(exchange, routing_key, body),
        )
        self._declared.update(q.name for q in to_declare)

    def declare(self, queue: Queue) -> None:
        """Declare ``queue`` (and its exchange and binding) for this publisher's next publishes, as
        its broker needs (:func:`~forseti_celery.core.transport.Transport.declare`: on RabbitMQ
        without waiting for the answer, which a publish after it on the same channel does not need;
        on Redis only a queue bound to a named exchange); raises :class:`BrokerUnavailable`."""
        with self._guard():
            self._transport.declare(self._channel(), [queue])
            self._declared.add(queue.name)

    def _channel(self) -> Any:
        # Connect with a bounded retry of our own: kombu's default_channel would otherwise follow
        # the app's broker_connection_* policy and block a caller far past its timeout.
        if not self._conn.connected:
            self._conn.ensure_connection(max_retries=1, interval_start=0.1, interval_step=0.2, interval_max=0.2,
                                         timeout=2.0)
        channel = self._conn.default_channel
        self._transport.prepare(channel)
        return channel

    def _reset(self) -> None:
        self._release_wire()
        self._producer = None
        self._declared.clear()
        try:
            self._conn.collect()
        except Exception:  # pragma: no cover - best effort after a failure
            pass

    def close(self) -> None:
        """Release the connection."""
        with self._lock:
            self._release_wire()
            self._producer = None
            self._conn.release()

    def _release_wire(self) -> None:
        """The connection the Redis wire of the producer's channel keeps goes back to its pool."""
        if self._producer is not None:
            transport.redis_wire.release(self._producer.channel)


class Batcher:
    """Publishes queued messages in order, many to a broker message.

    ``put`` only queues; a sender thread publishes whatever accumulated while the
    previous batch was on the wire, so a burst of sends costs a few publishes.
    ``flush`` publishes everything queued so far from the calling thread (a call
    flushes before it waits, which keeps it behind the sends made before it).
    Messages to one destination keep their order. A broker message holds at most ``max_bytes``
    of messages encoded by their senders (:class:`~forseti_celery.core.protocol.Encoded`), or one.
    """

    #: Most messages in one broker message.
    max_batch = 500

    def __init__(self, publish: Callable[[str, list[Message | Encoded]], None], name: str = "forseti-sender",
                 max_bytes: int = 2**63) -> None:
        self._publish = publish
        self.max_bytes = max_bytes
        self._queue: deque[tuple[str, Message | Encoded]] = deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._start_lock = threading.Lock()

    def put(self, routing_key: str, msg: Message | Encoded) -> None:
        """Queue ``msg``; the sender thread publishes it shortly."""
        self._queue.append((routing_key, msg))
        if self._thread.ident is None:  # not started (``is_alive`` takes a lock: a tenth of a send)
            with self._start_lock:
                if self._thread.ident is None:
                    self._thread.start()
        if not self._wakeup.is_set():  # set until the sender thread clears it, before it flushes
            self._wakeup.set()

    def send(self, routing_key: str, msg: Message | Encoded) -> None:
        """Publish ``msg`` now, from the calling thread, behind everything queued before it (the
        sender thread is not woken for it); raises :class:`BrokerUnavailable`."""
        self._queue.append((routing_key, msg))
        self.flush()

    def flush(self) -> None:
        """Publish everything queued so far; raises :class:`BrokerUnavailable` (those messages are lost)."""
        with self._lock:
            queue = self._queue
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), self.max_batch))]
                start = size = 0
                for i, (routing_key, msg) in enumerate(batch):
                    n = len(msg.data) + 2 if isinstance(msg, Encoded) else 0
                    if i > start and (routing_key != batch[start][0] or size + n > self.max_bytes):
                        self._publish(batch[start][0], [m for _, m in batch[start:i]])
                        start = i
                        size = 0
                    size += n
                self._publish(batch[start][0], [m for _, m in batch[start:]])

    def _run(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            try:
                self.flush()
            except BrokerUnavailable as exc:
                logger.warning("forseti: messages not sent: %s", exc)
            except Exception:
                logger.exception("forseti: sender failed")
