"""The test suite's worker app (``tests.app``) with keyed processes that passivate (issue 12)."""

from __future__ import annotations

import os
import time
from typing import Any

from forseti_celery import KeyedProcess
from tests.app import app, forseti, journal

__all__ = ["app", "forseti"]


class Journaled(KeyedProcess):
    """Records its start, each cast it takes and its end (with the reason) in the journal; a call
    answers what it has taken, in order, and its pid."""

    linger = 0.0

    def init(self, key: str, *args: Any) -> None:
        self.key, self.seen = key, []
        journal("start", key, args=list(args))

    def handle_cast(self, msg: Any) -> None:
        self.seen.append(msg)
        journal("cast", self.key, msg=msg)

    def handle_call(self, msg: Any) -> Any:
        if msg != "seen":
            self.seen.append(msg)
            journal("call", self.key, msg=msg)
        if isinstance(msg, dict) and "sleep" in msg:
            time.sleep(msg["sleep"])
        return {"seen": self.seen, "pid": os.getpid()}

    def terminate(self, reason: str) -> None:
        journal("terminating", self.key, reason=reason)
        time.sleep(self.linger)  # saving its state, say: messages for it arrive meanwhile
        journal("terminate", self.key, reason=reason)


class Ticking(Journaled):
    """Has a timer tick every 0.2 s, which keeps it alive (``keep_alive``) or not."""

    keep_alive = True

    def init(self, key: str, *args: Any) -> None:
        super().init(key, *args)
        self.send_every(0.2, "tick", keep_alive=self.keep_alive)

    def handle_info(self, msg: Any) -> None:
        pass  # a tick: not a cast


#: Passivated after 0.5 s without a cast or call.
forseti.keyed(type("Idle", (Journaled,), {}), name="idle", idle_timeout=0.5)
#: Passivated after 0.3 s, and takes a second to end: messages arrive while it passivates.
forseti.keyed(type("Lingering", (Journaled,), {"linger": 1.0}), name="lingering_idle", idle_timeout=0.3)
#: Idle for an hour before passivation: a deadline the worker keeps, never due during a test.
forseti.keyed(type("Sleepy", (Journaled,), {}), name="sleepy", idle_timeout=3600)
#: Ticks with keep_alive: never idle (its worker hears of a tick at most once a second).
forseti.keyed(type("KeptAlive", (Ticking,), {}), name="kept_alive", idle_timeout=1.5)
#: Ticks without keep_alive: passivated after 1.5 s all the same.
forseti.keyed(type("Polling", (Ticking,), {"keep_alive": False}), name="polling", idle_timeout=1.5)
#: Never idle; takes a second to end when stopped.
forseti.keyed(type("SlowStop", (Journaled,), {"linger": 1.0}), name="slow_stop")
