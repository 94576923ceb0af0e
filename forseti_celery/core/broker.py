"""Broker plumbing shared by clients and workers: a thread-safe publisher and a
consumer thread that reconnects by itself.

Both open connections of their own from the Celery app's broker settings, so
forseti traffic never shares (or blocks) Celery's consumer connection, and a
task blocked on ``get_key`` in a solo worker cannot stall the leader or the
registry living in the same process.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import amqp.exceptions
import redis.exceptions
from celery.utils.log import get_logger
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import OperationalError

from . import transport
from .errors import BrokerUnavailable
from .protocol import CONTENT_ENCODING, CONTENT_TYPE, Encoded, Message, decode, encode

if TYPE_CHECKING:
    from .signing import Signer

logger = get_logger(__name__)

__all__ = ["Batcher", "ConsumerLoop", "Publisher", "RestartIntensity"]


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
            publish = self._conn.ensure(
                producer, self._publish_one,
                max_retries=self._retries, interval_start=0.1, interval_step=0.2, interval_max=0.3,
            )
            publish(producer, exchange, routing_key, body, declare, expiration)

    def _publish_one(self, producer: Producer, exchange: Exchange, routing_key: str, body: bytes,
                     declare: Iterable[Queue], expiration: float | None) -> None:
        ttl = self._transport.list_ttl(self._keep(routing_key), expiration)
        if ttl is None:
            self._put(producer.publish, exchange, routing_key, body, declare, expiration)
            return
        with self._transport.batch(producer.channel) as batch:
            self._put(producer.publish, exchange, routing_key, body, declare, None)
            batch.keep_at_least(routing_key, ttl)

    def keep_alive(self, routing_key: str) -> None:
        """Redis: raise the TTL of the list of ``routing_key``, if it exists, to ``keep(routing_key)``
        (its consumer's own queue then outlives any backlog it drains); raises :class:`BrokerUnavailable`."""
        ttl = self._transport.list_ttl(self._keep(routing_key), None)
        if ttl is None:
            return
        with self._guard(), self._transport.batch(self._ready().channel) as batch:
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
        bodies = [(routing_key, encode(messages)) for routing_key, messages in batches]
        with self._guard():
            producer = self._ready()
            with self._transport.batch(producer.channel) as batch:
                for routing_key, body in bodies:
                    self._put(producer.publish, exchange, routing_key, body, declare(routing_key), None)
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

    def _put(self, publish: Callable[..., Any], exchange: Exchange, routing_key: str, body: bytes,
             declare: Iterable[Queue], expiration: float | None) -> None:
        to_declare = [q for q in declare if q.name not in self._declared]
        publish(
            body, exchange=exchange, routing_key=routing_key,
            content_type=CONTENT_TYPE, content_encoding=CONTENT_ENCODING,
            declare=[exchange, *to_declare], expiration=expiration, retry=False,
            headers=None if self._signer is None else self._signer.headers(exchange.name, routing_key, body),
        )
        self._declared.update(q.name for q in to_declare)

    def declare(self, queue: Queue) -> None:
        """Declare ``queue`` (and its exchange and binding) now; raises :class:`BrokerUnavailable`."""
        with self._guard():
            queue.bind(self._channel()).declare()
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
        self._producer = None
        self._declared.clear()
        try:
            self._conn.collect()
        except Exception:  # pragma: no cover - best effort after a failure
            pass

    def close(self) -> None:
        """Release the connection."""
        with self._lock:
            self._producer = None
            self._conn.release()


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
        if not self._thread.is_alive():
            with self._start_lock:
                if not self._thread.is_alive():
                    self._thread.start()
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


Handler = Callable[[list[Message]], None]


class ConsumerLoop(threading.Thread):
    """A daemon thread consuming queues with ``no_ack`` (but see ``windowed``); reconnects with backoff.

    ``handler`` gets each batch (the protocol messages of one broker message). ``tick`` runs at least
    every ``interval`` seconds (also while disconnected). Every failure, a lost or unreachable broker
    included, is counted against ``intensity`` (the backoff grows to 2 s, so a broker away for
    long trips only a tight budget); past it the loop ends, keeps the last error in
    :attr:`failure` and calls ``on_give_up`` with it: the owner decides what a dead loop means.
    """

    def __init__(
        self,
        name: str,
        connection_factory: Callable[[], Connection],
        queues: Callable[[], list[Queue]],
        handler: Handler,
        *,
        intensity: RestartIntensity,
        tick: Callable[[], None] | None = None,
        interval: float = 0.25,
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        on_give_up: Callable[[BaseException], None] | None = None,
        admit: Callable[[Any, list[Message]], list[Message]] | None = None,
        windowed: Callable[[], list[Queue]] = lambda: [],
    ) -> None:
        """``admit(message, batch)``: what of the batch decoded from a kombu message to handle (a
        worker's :meth:`~forseti_celery.core.signing.Signer.admit`); all of it without one.

        ``windowed()``: queues (among ``queues()``) a flood may come through. On RabbitMQ they are
        consumed with acks and a prefetch of :attr:`window` broker messages, so a backlog of theirs
        waits in the broker, not in this connection, ahead of the other queues' messages (a
        worker's own heartbeat echo among them). Each is acknowledged as it arrives, before it is
        handled, and one the broker delivers again after a lost connection is dropped: a message is
        handled at most once, as with ``no_ack``. Redis needs none of this: kombu fetches a list's
        messages one BRPOP at a time, and a fanout comes on a connection of its own.
        """
        super().__init__(name=name, daemon=True)
        self._windowed = windowed
        self._admit = admit
        self._on_give_up = on_give_up
        self._connection_factory = connection_factory
        self._queues = queues
        self._handler = handler
        self._tick = tick
        self._interval = interval
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._intensity = intensity
        self._stopping = threading.Event()
        self._consumer: Consumer | None = None
        self.connected = threading.Event()
        #: Why the loop gave up (restart intensity reached), if it did.
        self.failure: BaseException | None = None

    #: Broker messages of the ``windowed`` queues on their way to this thread at most (RabbitMQ):
    #: each holds up to 500 protocol messages (a client's batch), a few ms of work, so what else
    #: arrives waits behind some 0.1 s of them at worst, where a whole backlog fenced a worker.
    window = 8

    # -- control (from any thread) --------------------------------------------------
    def stop(self, timeout: float = 5.0, wake: Callable[[], None] | None = None) -> None:
        """Ask the loop to end and wait for it.

        ``wake`` (e.g. a message to one of its queues) ends the broker read the loop may be
        blocked in: on Redis, closing a connection with a BRPOP pending waits for its answer,
        up to kombu's ``brpop_timeout`` (1 s).
        """
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            if wake is not None and self.connected.is_set():
                self._safe(wake)
            self.join(timeout)

    # -- called from the loop thread only ----------------------------------------------
    def add_queue(self, queue: Queue) -> None:
        """Start consuming ``queue`` on the live consumer (no-op while disconnected)."""
        if self._consumer is not None and not self._consumer.consuming_from(queue):
            self._consumer.add_queue(queue)
            self._consumer.consume()

    def cancel_queue(self, queue: Queue) -> None:
        """Stop consuming ``queue``."""
        if self._consumer is not None and self._consumer.consuming_from(queue):
            self._consumer.cancel_by_queue(queue.name)

    def run(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                self._serve()
                backoff = 0.1
            except Exception as exc:
                self.connected.clear()
                self._consumer = None
                if self._on_disconnect is not None:
                    self._safe(self._on_disconnect)
                if _is_connection_error(exc):
                    logger.warning("forseti: %s lost the broker (%r); reconnecting", self.name, exc)
                else:
                    logger.exception("forseti: %s failed", self.name)
                if not self._intensity.failed():
                    self.failure = exc
                    logger.error(
                        "forseti: %s gave up: more than %d failures in %g s (forseti_max_retries/"
                        "forseti_max_time); last: %r", self.name, self._intensity.max_retries,
                        self._intensity.max_time, exc,
                    )
                    if self._on_give_up is not None:
                        self._safe(functools.partial(self._on_give_up, exc))
                    return
                deadline = time.monotonic() + backoff
                while not self._stopping.is_set() and time.monotonic() < deadline:
                    if self._tick is not None:
                        self._safe(self._tick)
                    self._stopping.wait(min(self._interval, max(0.0, deadline - time.monotonic())))
                backoff = min(backoff * 2, 2.0)

    def _serve(self) -> None:
        with self._connection_factory() as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.channel()
            windowed = self._windowed() if transport.for_connection(conn).prefetch_windows else []
            names = {q.name for q in windowed}
            consumer = Consumer(channel, [q for q in self._queues() if q.name not in names], no_ack=True,
                                on_message=self._on_message)
            consumer.consume()
            if windowed:
                channel.basic_qos(0, self.window, False)  # per consumer; no_ack consumers ignore it
                Consumer(channel, windowed, no_ack=False, on_message=self._on_windowed).consume()
            self._consumer = consumer
            # A first round of the event loop subscribes fanout queues (Redis pub/sub) for real.
            try:
                conn.drain_events(timeout=0.001)
            except TimeoutError:
                pass
            self.connected.set()
            if self._on_connect is not None:
                self._on_connect()
            next_tick = time.monotonic()
            while not self._stopping.is_set():
                now = time.monotonic()
                if now >= next_tick:
                    if self._tick is not None:
                        self._run_tick(self._tick)
                    next_tick = now + self._interval
                try:
                    conn.drain_events(timeout=max(0.001, next_tick - time.monotonic()))
                except TimeoutError:
                    pass
                conn.heartbeat_check()
            self._consumer = None
            self.connected.clear()
            try:
                consumer.cancel()
            except Exception:  # closing anyway
                pass

    def _on_windowed(self, message: Any) -> None:
        message.ack()  # before handling: a connection lost meanwhile cannot deliver it twice
        if message.delivery_info.get("redelivered"):
            # Delivered before, on a connection lost since: perhaps handled already.
            logger.info("forseti: %s dropped a message delivered again after a reconnection", self.name)
            return
        self._on_message(message)

    def _on_message(self, message: Any) -> None:
        try:
            batch = decode(message.body)
            self._handler(batch if self._admit is None else self._admit(message, batch))
        except BrokerUnavailable as exc:
            logger.warning("forseti: %s could not answer: %r", self.name, exc)
        except Exception:
            logger.exception("forseti: %s could not handle a message", self.name)

    def _run_tick(self, tick: Callable[[], None]) -> None:
        """Run the tick on a live connection: a lost broker ends the connection (to reconnect),
        any other failure is logged and costs neither the connection nor the restart intensity."""
        try:
            tick()
        except Exception as exc:
            if _is_connection_error(exc):
                raise
            logger.exception("forseti: %s tick failed", self.name)

    def _safe(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            logger.exception("forseti: %s callback failed", self.name)


_CONNECTION_ERRORS = (
    OSError, EOFError, OperationalError, BrokerUnavailable, amqp.exceptions.ConnectionError,
    amqp.exceptions.ChannelError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
)


def _is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, _CONNECTION_ERRORS)
