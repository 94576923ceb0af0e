"""The test suite's worker app (``tests.app``) with a keyed process that records, by number, each
message it handles (issue 12: what a crashed process never took goes to its next incarnation)."""

from __future__ import annotations

import os
from typing import Any

from forseti_celery import KeyedProcess
from tests.app import app, forseti, journal

__all__ = ["app", "forseti"]


@forseti.keyed(name="recording")
class Recording(KeyedProcess):
    """Takes ``{"i": n, ...}`` messages (a cast or a call), journals each ``n``; a call answers
    the numbers it has handled, in order, and its pid (``"seen"`` only answers)."""

    def init(self, key: str, *args: Any) -> None:
        self.key, self.seen = key, []
        journal("start", key)

    def handle_cast(self, msg: Any) -> None:
        self.seen.append(msg["i"])
        journal("handled", self.key, i=msg["i"])

    def handle_call(self, msg: Any) -> Any:
        if msg != "seen":
            self.handle_cast(msg)
        return {"seen": self.seen, "pid": os.getpid()}
