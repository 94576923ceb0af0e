"""The consumer thread of clients and workers: consumes queues on a connection of its own and
reconnects by itself, within a restart intensity.

A connection of its own, from the Celery app's broker settings, so forseti traffic never shares
(or blocks) Celery's consumer connection, and a task blocked on ``get_key`` in a solo worker
cannot stall the leader or the registry living in the same process. On Redis it reads without
kombu's event loop when it can (:mod:`.transport.redis_consume`, guarded): the same commands,
no kombu ``Message`` per message.

Owns the loop: connecting, consuming (RabbitMQ's windowed queues acknowledged), the tick, the
reconnections and the restart intensity, and the step (a tick if due, one wait for messages) its
thread or a caller repeats. How a client's callers read on their own threads with its work lent
(``drive``, ``read_free``), and how the loop thread lends it, is :mod:`.lent_reads`'s (a mixin).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from celery.utils.log import get_logger
from kombu import Connection, Consumer, Queue
from kombu.exceptions import OperationalError

from . import transport
from .baton import Baton
from .broker import RestartIntensity
from .errors import BrokerUnavailable
from .lent_reads import LentReads
from .protocol import Message, decode
from .transport import redis_consume

logger = get_logger(__name__)

__all__ = ["ConsumerLoop"]


Handler = Callable[[list[Message]], None]


class ConsumerLoop(LentReads, threading.Thread):
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
        busy: Callable[[], bool] | None = None,
        awaited: Callable[[], bool] = lambda: False,
    ) -> None:
        """``admit(message, batch)``: what of the batch decoded from a kombu message to handle (a
        worker's :meth:`~forseti_celery.core.signing.Signer.admit`); all of it without one.

        ``windowed()``: queues (among ``queues()``) a flood may come through. On RabbitMQ they are
        consumed with acks and a prefetch of :attr:`window` broker messages, so a backlog of theirs
        waits in the broker, not in this connection, ahead of the other queues' messages (a
        worker's own heartbeat echo among them). Each is acknowledged once handled (every
        :attr:`acks_every` in one frame, what is left at the next tick), and one the broker
        delivers again after a lost connection is dropped: a message is handled at most once, as
        with ``no_ack``. Redis needs none of this: a list's messages come
        one BRPOP at a time (kombu's, or :mod:`.transport.redis_consume`'s), a fanout on a
        connection of its own.

        ``busy()``: a client's loop, whose callers may take its work over (:meth:`drive`); true
        while answers are awaited besides the driving caller's (the loop thread takes the work
        back at once then). Without it (a worker's loops) only the loop thread reads.

        ``awaited()``: an answer is still awaited (a client's loop): the loop thread that has handed
        a sync caller its answer (:meth:`answered`) leaves its work free for that caller's next
        request only when none is (:meth:`.baton.Baton.release`).
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
        self._fast: redis_consume.RedisConsumer | None = None  # Redis without kombu's event loop
        self._transport: transport.Transport = transport.named("")
        self.connected = threading.Event()
        self._reading = threading.Event()  # a read may be pending (before ``connected``: the lists only)
        self._busy = busy
        self._awaited = awaited
        self._answered = False  # the holder handed a sync caller its answer (see answered)
        self._unheard: redis_consume.RedisConsumer | None = None  # its fanouts' subscription not confirmed
        #: The loop's work as a role (callers may drive it), or None: the loop thread's alone.
        self._baton = Baton() if busy is not None else None
        # The role holder's (the loop thread, or a caller driving: see .baton).
        self._read: Callable[[float], None] | None = None  # one wait for messages, on the live connection
        self._next_tick = 0.0
        self._lost: BaseException | None = None  # a driving caller's failure, for the loop thread to raise
        self._handled: Any = None  # the last windowed message handled and not acknowledged yet
        self._unacked = 0  # how many are (up to it)
        #: Why the loop gave up (restart intensity reached), if it did.
        self.failure: BaseException | None = None

    #: Broker messages of the ``windowed`` queues on their way to this thread at most (RabbitMQ):
    #: each holds up to 500 protocol messages (a client's batch), a few ms of work, so what else
    #: arrives waits behind some 0.1 s of them at worst, where a whole backlog fenced a worker.
    window = 8
    #: Windowed messages handled before one acknowledgement covers them all (``multiple``): one
    #: frame (a system call, and the broker's work) for several, well before the window fills;
    #: the tick acknowledges what is left.
    acks_every = window // 2

    # -- control (from any thread) --------------------------------------------------
    def stop(self, timeout: float = 5.0, wake: Callable[[], None] | None = None) -> None:
        """Ask the loop to end and wait for it.

        ``wake`` (e.g. a message to one of its queues) ends the broker read the loop may be
        blocked in: on Redis, closing a connection with a BRPOP pending waits for its answer,
        up to kombu's ``brpop_timeout`` (1 s).
        """
        self._stopping.set()
        if self._baton is not None:
            self._baton.wake()
        if self.is_alive() and threading.current_thread() is not self:
            if wake is not None and self._reading.is_set():
                self._safe(wake)
            self.join(timeout)

    # -- called from the loop thread only ----------------------------------------------
    def add_queue(self, queue: Queue) -> None:
        """Start consuming ``queue`` on the live consumer (no-op while disconnected)."""
        if self._fast is not None:
            if not self._fast.consuming_from(queue.name):
                self._transport.declare(self._fast.channel, [queue], consumer=True)
                self._fast.add_queue(queue)
        elif self._consumer is not None and not self._consumer.consuming_from(queue):
            channel = self._consumer.channel
            self._transport.declare(channel, [queue], consumer=True)
            self._consumer.add_queue(queue)
            self._consumer.consume()

    def cancel_queue(self, queue: Queue) -> None:
        """Stop consuming ``queue``."""
        if self._fast is not None:
            self._fast.cancel_queue(queue.name)
        elif self._consumer is not None and self._consumer.consuming_from(queue):
            self._consumer.cancel_by_queue(queue.name)

    def run(self) -> None:
        try:
            self._run()
        finally:
            if self._baton is not None:
                self._baton.close()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                self._serve()
                backoff = 0.1
            except Exception as exc:
                self.connected.clear()
                self._consumer = self._fast = None
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
            kind = self._transport = transport.for_connection(conn)
            buffered = kind is transport.amqp and transport.amqp.buffer_reads(conn)  # a frame in one recv
            windowed = self._windowed() if kind.prefetch_windows else []
            names = {q.name for q in windowed}
            queues = [q for q in self._queues() if q.name not in names]
            # Declared as the broker needs them (Transport.declare), before consuming them.
            kind.declare(channel, [*queues, *windowed], consumer=True)
            fast = redis_consume.open_consumer(channel, queues, self._on_message) if kind is transport.redis else None
            if fast is None:
                self._consumer = self._consume(conn, channel, queues, windowed)
            self._fast = fast
            try:
                self._loop(conn, fast, buffered)
            finally:
                self._consumer = self._fast = None
                self._handled, self._unacked = None, 0  # a lost channel's: delivered again, and dropped
                self._read = self._unheard = None
                self.connected.clear()
                self._reading.clear()
                if fast is not None:
                    fast.close()

    def _consume(self, conn: Connection, channel: Any, queues: list[Queue], windowed: list[Queue]) -> Consumer:
        """kombu's consumers of ``queues`` (and, acknowledged within a window, ``windowed``)."""
        consumer = Consumer(channel, queues, no_ack=True, on_message=self._on_message, auto_declare=False)
        consumer.consume()
        if windowed:
            channel.basic_qos(0, self.window, False)  # per consumer; no_ack consumers ignore it
            Consumer(channel, windowed, no_ack=False, on_message=self._on_windowed, auto_declare=False).consume()
        # A first round of the event loop subscribes fanout queues (Redis pub/sub) for real.
        try:
            conn.drain_events(timeout=0.001)
        except TimeoutError:
            pass
        return consumer

    def _loop(self, conn: Connection, fast: redis_consume.RedisConsumer | None, buffered: bool) -> None:
        """Read and tick until stopped (``fast``: Redis's reads without kombu's event loop;
        ``buffered``: RabbitMQ's reads ahead, :func:`.transport.amqp.buffer_reads`).

        ``connected`` and ``on_connect`` once every queue is heard: on Redis's fast path the lists
        are read (a client's first answers handled) while the fanouts' subscription is confirmed.
        A client's loop hands its work to a caller asking for it (:meth:`drive`; on Redis already
        while the subscription is confirmed, which whoever reads then notices) and parks until
        given it back (:class:`.baton.Baton`); on a transport whose reads cannot be woken (kombu's
        event loop: the guards off, TLS, another broker) its callers wait as before.
        """
        self._reading.set()
        baton, self._read = self._baton, self._reader(conn, fast, buffered)
        if self._read is None:
            baton, self._read = None, functools.partial(_drain_events, conn)
        self._unheard = fast if fast is not None and not fast.subscribed else None
        while baton is None and self._unheard is not None and not self._unheard.subscribed:
            # A worker's loop reads nothing else before every queue is heard.
            if self._stopping.is_set():
                return  # never connected: the owner hears of no connection
            self._unheard.drain(self._interval)
        self._check_heard()
        self._next_tick = time.monotonic()
        if baton is not None:
            baton.enable(True)
        try:
            while not self._stopping.is_set():
                answered, self._answered = self._answered, False
                if baton is not None and ((baton.wanted and baton.hand_over()) or (answered and self._release(baton))):
                    baton.park(self._next_tick if self._tick is not None else float("inf"), self._stopping)
                    self._answered = False  # handed over by a caller meanwhile: it read for itself
                    lost, self._lost = self._lost, None
                    if lost is not None:
                        raise lost
                    continue
                self._step(float("inf"))
        finally:
            if baton is not None:
                baton.enable(False)
        if self._consumer is not None:
            try:
                self._ack_handled()
                self._consumer.cancel()
            except Exception:  # closing anyway
                pass

    def _check_heard(self) -> None:
        """``connected`` and ``on_connect`` once the fanouts' subscription is confirmed (the holder's)."""
        if self._unheard is not None and not self._unheard.subscribed:
            return
        self._unheard = None
        self.connected.set()
        if self._on_connect is not None:
            self._on_connect()

    def _step(self, until: float) -> None:
        """The tick if due, then one wait for messages, up to the next tick or ``until`` (the role
        holder's)."""
        now = time.monotonic()
        if now >= self._next_tick:
            if self._tick is not None:
                self._run_tick(self._tick)
            if self._handled is not None:
                self._ack_handled()
            self._next_tick = now + self._interval
        read = self._read
        assert read is not None
        read(max(0.001, min(self._next_tick, until) - time.monotonic()))
        if self._unheard is not None:
            self._check_heard()

    def _on_windowed(self, message: Any) -> None:
        if message.delivery_info.get("redelivered"):
            # Delivered before, on a connection lost since: perhaps handled already.
            self._handled, self._unacked = message, self._unacked + 1
            self._ack_handled()
            logger.info("forseti: %s dropped a message delivered again after a reconnection", self.name)
            return
        try:
            self._on_message(message)
        finally:  # once handled: the ack's write (and the broker it wakes) is off the message's way
            self._handled, self._unacked = message, self._unacked + 1
            if self._unacked >= self.acks_every:
                self._ack_handled()

    def _ack_handled(self) -> None:
        """Acknowledge the windowed messages handled so far, in one frame (delivery tags grow in
        the order of delivery, which is the order they are handled in)."""
        message, self._handled, self._unacked = self._handled, None, 0
        if message is not None:
            message.ack(multiple=True)

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


def _drain_events(conn: Connection, timeout: float) -> None:
    """kombu's wait for messages on ``conn`` (the event loop's), then its heartbeat."""
    try:
        conn.drain_events(timeout=timeout)
    except TimeoutError:
        pass
    conn.heartbeat_check()


_CONNECTION_ERRORS = (
    OSError, EOFError, OperationalError, BrokerUnavailable, *transport.CONNECTION_ERRORS,
)


def _is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, _CONNECTION_ERRORS)
