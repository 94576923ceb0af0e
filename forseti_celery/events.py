"""Worker events for keyed-process starts and exits and leader changes.

Sent on a dispatcher of forseti's own, which (unlike the worker's dispatcher
without ``-E``) delivers every group, so ``celery events`` and Flower receive
them from any worker. Events are transient: they inform monitors, while the
leader learns of exits through its queue.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery
from celery.utils.log import get_logger

logger = get_logger(__name__)

__all__ = ["EventSender"]


class EventSender:
    """Thread-safe ``forseti-*`` event sender with its own broker connection."""

    def __init__(self, app: Celery, hostname: str, namespace: str) -> None:
        self._app = app
        self._hostname = hostname
        self._namespace = namespace
        self._lock = threading.Lock()
        self._conn: Any = None
        self._dispatcher: Any = None

    def send(self, type_: str, **fields: Any) -> None:
        """Send one event; a broker outage only loses the event (it is logged at DEBUG)."""
        with self._lock:
            try:
                if self._dispatcher is None:
                    self._conn = self._app.connection_for_write()
                    self._dispatcher = self._app.events.Dispatcher(
                        self._conn, hostname=self._hostname, enabled=True, groups=None,
                    )
                self._dispatcher.send(type_, namespace=self._namespace, **fields)
            except Exception as exc:
                logger.debug("forseti: event %s not sent: %r", type_, exc)
                self._close()

    def _close(self) -> None:
        try:
            if self._dispatcher is not None:
                self._dispatcher.close()
            if self._conn is not None:
                self._conn.release()
        except Exception:
            pass
        self._dispatcher = self._conn = None

    def close(self) -> None:
        """Release the connection."""
        with self._lock:
            self._close()
