"""Worker events for keyed-process starts and exits and leader changes.

Sent on a dispatcher of forseti's own, which (unlike the worker's dispatcher
without ``-E``) delivers every group, so ``celery events`` and Flower receive
them from any worker. Events are transient: they inform monitors, while the
leader learns of exits through its queue.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any

from celery import Celery
from celery.utils.log import get_logger

from ..core.compat import reuse_redis_client

logger = get_logger(__name__)

__all__ = ["EventSender"]


class EventSender:
    """``forseti-*`` event sender with its own connection and thread.

    :meth:`send` only queues (with the time of the fact), so the keyed-process hot
    paths never wait on a monitoring publish; a broker outage loses events only.
    """

    def __init__(self, app: Celery, hostname: str, namespace: str) -> None:
        self._app = app
        self._hostname = hostname
        self._namespace = namespace
        self._queue: queue.SimpleQueue[tuple[str, dict[str, Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="forseti-events", daemon=True)
        self._thread.start()

    def send(self, type_: str, **fields: Any) -> None:
        """Queue one event."""
        self._queue.put((type_, {"timestamp": time.time(), "namespace": self._namespace, **fields}))

    def _run(self) -> None:
        conn: Any = None
        dispatcher: Any = None
        while (item := self._queue.get()) is not None:
            type_, fields = item
            try:
                if dispatcher is None:
                    conn = self._app.connection_for_write()
                    dispatcher = self._app.events.Dispatcher(conn, hostname=self._hostname, enabled=True, groups=None)
                    reuse_redis_client(dispatcher.producer.channel)
                dispatcher.send(type_, **fields)
            except Exception as exc:
                logger.debug("forseti: event %s not sent: %r", type_, exc)
                with contextlib.suppress(Exception):
                    dispatcher.close()
                    conn.release()
                dispatcher = conn = None
        with contextlib.suppress(Exception):
            if dispatcher is not None:
                dispatcher.close()
                conn.release()

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued, then release the connection."""
        self._queue.put(None)
        self._thread.join(timeout)
