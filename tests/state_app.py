"""The workers' app of issue 13's tests (``celery -A tests.state_app worker``): movable keyed
processes (they define ``snapshot``), whose state tells a test what every incarnation handled.

``tally`` counts what it is sent. Every message is ``{"c": client, "s": seq, "n": amount, "t":
time sent}``, ``seq`` counting up from 1 per client and key: a message whose ``seq`` is not above
the last one of its client was handled twice (``dups``), one past more than one lost those in
between (``gaps``). The state moves with the key (snapshot/restore), so after a rolling restart
``count`` is the sum of every message handled once. ``incarnations`` lists the pid of each
process the key had (each ``restore`` adds its own), ``delay`` the longest a message took from
its client to its handler, in seconds (the pause a handoff made it wait, at most).

``fragile`` is a ``tally`` whose ``init`` args (``mode``, ...) make its handoff go wrong:
``snapshot-raises``, ``restore-raises``, ``big`` (a snapshot of ``size`` bytes), ``slow``
(``snapshot`` takes ``seconds``), ``slow-restore`` (``restore`` takes ``seconds``). It journals
``snapshot`` and ``restoring`` as those begin.

Settings from the environment besides the harness' (``tests.cluster_conf``):
``FORSETI_REBALANCE``, ``FORSETI_REBALANCE_BATCH``, ``FORSETI_HANDOFF_TIMEOUT``.
Starts and ends are journaled (``tests.app.journal``) for the "one live process" monitor.
"""

from __future__ import annotations

import os
import time
from typing import Any

from forseti_celery import KeyedProcess
from tests.app import app, forseti, journal

__all__ = ["app", "forseti", "message"]

if os.environ.get("FORSETI_REBALANCE"):
    app.conf.forseti_rebalance = os.environ["FORSETI_REBALANCE"]
if os.environ.get("FORSETI_REBALANCE_BATCH"):
    app.conf.forseti_rebalance_batch = int(os.environ["FORSETI_REBALANCE_BATCH"])
if os.environ.get("FORSETI_HANDOFF_TIMEOUT"):
    app.conf.forseti_handoff_timeout = float(os.environ["FORSETI_HANDOFF_TIMEOUT"])


def message(client: str, seq: int, n: int = 1) -> dict[str, Any]:
    """What a client sends a ``tally``: its ``seq``-th message to the key, adding ``n``."""
    return {"c": client, "s": seq, "n": n, "t": time.time()}


@forseti.keyed(name="tally", idle_timeout=None)
class Tally(KeyedProcess):
    """Counts what it is sent (see the module's docstring); ``call("state")`` answers its state."""

    def init(self, key: str, *args: Any) -> None:
        self.key, self.args = key, list(args)
        self.state: dict[str, Any] = {"count": 0, "last": {}, "dups": 0, "gaps": 0, "delay": 0.0,
                                      "incarnations": [os.getpid()], "restored": False}
        journal("start", key, args=self.args)

    def handle_cast(self, msg: Any) -> None:
        self.take(msg)

    def handle_call(self, msg: Any) -> Any:
        if msg == "state":
            return {**self.state, "pid": os.getpid()}
        self.take(msg)
        return self.state["count"]

    def take(self, msg: dict[str, Any]) -> None:
        s = self.state
        last = s["last"].get(msg["c"], 0)
        if msg["s"] <= last:
            s["dups"] += 1
            return
        s["gaps"] += msg["s"] - last - 1
        s["last"][msg["c"]] = msg["s"]
        s["count"] += msg["n"]
        s["delay"] = max(s["delay"], time.time() - msg["t"])

    def snapshot(self) -> Any:
        return self.state

    def restore(self, state: Any) -> None:
        self.state = {**state, "incarnations": [*state["incarnations"], os.getpid()], "restored": True}
        journal("restore", self.key)

    def terminate(self, reason: str) -> None:
        journal("terminate", self.key, reason=reason)


@forseti.keyed(name="fragile", idle_timeout=None)
class Fragile(Tally):
    """A ``tally`` whose handoff goes wrong as its ``init`` args say (see the module's docstring)."""

    def init(self, key: str, *args: Any) -> None:
        super().init(key, *args)
        self.mode = args[0] if args else ""

    def snapshot(self) -> Any:
        journal("snapshot", self.key)
        if self.mode == "snapshot-raises":
            raise RuntimeError("snapshot asked to raise")
        if self.mode == "slow":
            time.sleep(float(self.args[1]))
        state = super().snapshot()
        if self.mode == "big":
            return {**state, "ballast": "x" * int(self.args[1])}
        return state

    def restore(self, state: Any) -> None:
        journal("restoring", self.key)
        if self.mode == "slow-restore":
            time.sleep(float(self.args[1]))
        if self.mode == "restore-raises":
            raise RuntimeError("restore asked to raise")
        if self.mode == "big":
            assert len(state.pop("ballast")) == int(self.args[1]), "the ballast came back cut"
        super().restore(state)
