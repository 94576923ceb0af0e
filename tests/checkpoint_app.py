"""The workers' app of the checkpoint tests (``celery -A tests.checkpoint_app worker``): the test
suite's app (``tests.app``) with checkpoints on (``forseti_state_url`` from ``FORSETI_STATE_URL``)
and ``ledger``, a movable keyed process that checkpoints after each addition."""

from __future__ import annotations

import os
import time
from typing import Any

from forseti_celery import KeyedProcess
from tests.app import app, forseti, journal

__all__ = ["app", "forseti"]

if os.environ.get("FORSETI_STATE_URL"):
    app.conf.forseti_state_url = os.environ["FORSETI_STATE_URL"]


@forseti.keyed(name="ledger")
class Ledger(KeyedProcess):
    """``call({"add": n})`` adds ``n`` to its total, checkpoints, answers the total and whether
    the checkpoint was stored; ``call({"add": n, "keep": False})`` adds without a checkpoint;
    ``call("get")`` answers ``{"total", "pid", "restored"}``; ``send({"add": n, "nap": s})`` adds,
    journals ``napping``, sleeps ``s`` seconds, then checkpoints and journals ``checkpoint`` with
    ``stored`` (True, or False when refused)."""

    def init(self, key: str, *args: Any) -> None:
        self.key, self.total, self.restored = key, 0, False

    def handle_cast(self, msg: Any) -> None:
        self.total += msg["add"]
        journal("napping", self.key)
        time.sleep(msg["nap"])
        journal("checkpoint", self.key, stored=self.checkpoint(), total=self.total)

    def handle_call(self, msg: Any) -> Any:
        if msg == "get":
            return {"total": self.total, "pid": os.getpid(), "restored": self.restored}
        self.total += msg["add"]
        stored = self.checkpoint() if msg.get("keep", True) else None
        return {"total": self.total, "stored": stored}

    def snapshot(self) -> Any:
        return {"total": self.total}

    def restore(self, state: Any) -> None:
        self.total, self.restored = state["total"], True
