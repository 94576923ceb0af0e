"""The test suite's worker app (``tests.app``) with keyed processes of each restart policy."""

from __future__ import annotations

import os
import sys
from typing import Any

from forseti_celery import KeyedProcess
from tests.app import app, forseti, journal

__all__ = ["app", "forseti"]


class Restartable(KeyedProcess):
    """Records its start and end in the journal; ends as its casts say: ``crash`` (raises),
    ``exit`` (a normal end, ``sys.exit(0)``); a call answers its args and pid."""

    def init(self, key: str, *args: Any) -> None:
        self.key, self.args = key, list(args)
        journal("start", key, args=self.args)

    def handle_cast(self, msg: Any) -> None:
        if msg == "crash":
            raise RuntimeError("asked to crash")
        if msg == "exit":
            journal("end", self.key)
            sys.exit(0)

    def handle_call(self, msg: Any) -> Any:
        return {"args": self.args, "pid": os.getpid()}

    def terminate(self, reason: str) -> None:
        journal("terminate", self.key, reason=reason)


for _policy in ("temporary", "transient", "permanent"):
    forseti.keyed(type(_policy, (Restartable,), {}), name=_policy, restart=_policy)
#: Two restarts within a minute, then given up.
forseti.keyed(type("fragile", (Restartable,), {}), name="fragile", restart="transient", max_restarts=2)
#: Many restarts: its back-off grows long enough to fail the leader over during one.
forseti.keyed(type("stubborn", (Restartable,), {}), name="stubborn", restart="permanent", max_restarts=20)
