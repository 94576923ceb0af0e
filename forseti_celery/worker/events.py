"""Worker events for keyed-process starts and exits and leader changes.

Sent on a dispatcher of forseti's own, which (unlike the worker's dispatcher
without ``-E``) delivers every group, so ``celery events`` and Flower receive
them from any worker. Events are transient: they inform monitors, while the
leader learns of exits through its queue.

The events thread sends in batches: woken for one event, it waits
:data:`LINGER` for more, then publishes what came in one broker message, a
list of events (Celery's own buffered group, routing key ``forseti.multi``,
which Celery's ``EventReceiver`` -- ``celery events``, Flower -- unpacks
into single events, each with its own timestamp and in order). The events a
client's cache of refs listens to (:data:`~..core.names.CACHE_EVENTS`: exits,
a lost node, a new leader) are bound by their own routing keys, so they keep
a message each, after the batch that came before them, and do not wait for
the linger (a client drops a ref on an exit event: it should not hold a stale
one longer).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any

from celery import Celery
from celery.utils.log import get_logger

from ..core import protocol as p
from ..core.compat import reuse_redis_client

logger = get_logger(__name__)

__all__ = ["LINGER", "EventSender"]

#: How long the events thread, woken for an event, waits for more before it publishes (seconds).
#: Events inform monitors, so 50 ms late is nothing to them, while new keys made one after another
#: (150-400 a second) then cost one wake-up and one publish per 7-20 keys instead of one per key (a
#: publish of a list costs about twice one of a single event here: 20 ms, 3-7 keys a batch, halved less).
LINGER = 0.05
#: The most events in one message (Celery's dispatcher publishes its buffer when it has this many).
BATCH_LIMIT = 100
#: Group of every forseti event type (Celery's group is the type up to its first dash).
_GROUP = "forseti"
_SINGLE = frozenset(p.CACHE_EVENTS)


class EventSender:
    """``forseti-*`` event sender with its own connection and thread.

    :meth:`send` only queues (with the time of the fact), so the keyed-process hot
    paths never wait on a monitoring publish; a broker outage loses events only.
    """

    def __init__(self, app: Celery, hostname: str, namespace: str, linger: float = LINGER) -> None:
        self._app = app
        self._hostname = hostname
        self._namespace = namespace
        self._linger = linger
        self._queue: queue.SimpleQueue[tuple[str, dict[str, Any]] | None] = queue.SimpleQueue()
        self._conn: Any = None  # the thread's own
        self._dispatcher: Any = None
        # Cuts the linger short: an event a client's cache listens to, or close(), sends what is queued at once.
        self._hurry = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="forseti-events", daemon=True)
        self._thread.start()

    def send(self, type_: str, **fields: Any) -> None:
        """Queue one event."""
        self._queue.put((type_, {"timestamp": time.time(), "namespace": self._namespace, **fields}))
        if type_ in _SINGLE:
            self._hurry.set()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            # A wait on the hurry flag, not a get with a timeout, so the events of the linger do not
            # wake this thread (only one a client's cache listens to does).
            if not self._closing:
                self._hurry.wait(self._linger)
            self._hurry.clear()  # before the drain: one set after it finds its event queued next time
            batch, more = [item], True
            while more:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    more = False
                else:
                    batch.append(nxt)
            self._publish(batch)
            if not more:
                break
        self._release()

    def _publish(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        try:
            if self._dispatcher is None:
                self._conn = self._app.connection_for_write()
                # Not buffered while offline: a failed publish raises, so the next batch reconnects.
                self._dispatcher = self._app.events.Dispatcher(
                    self._conn, hostname=self._hostname, enabled=True, groups=None, buffer_while_offline=False,
                    buffer_group={_GROUP}, buffer_limit=BATCH_LIMIT)
                reuse_redis_client(self._dispatcher.producer.channel)
            dispatcher = self._dispatcher
            for type_, fields in batch:
                if type_ in _SINGLE:
                    dispatcher.flush()  # what came before it goes first
                    dispatcher.publish(type_, fields, dispatcher.producer)
                else:
                    dispatcher.send(type_, **fields)
            dispatcher.flush()
        except Exception as exc:
            logger.debug("forseti: %d event(s) not sent: %r", len(batch), exc)
            self._release()

    def _release(self) -> None:
        with contextlib.suppress(Exception):
            if self._dispatcher is not None:
                self._dispatcher.close()
                self._conn.release()
        self._dispatcher = self._conn = None

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued, then release the connection."""
        self._queue.put(None)
        self._closing = True
        self._hurry.set()
        self._thread.join(timeout)
