"""The test suite's worker app (``tests.app``) with the keyed processes that exercise timers."""

from __future__ import annotations

import json
import time
from typing import Any

import forseti_celery
from forseti_celery import InvalidArgument, KeyedProcess, Timer, receive, send_after
from tests.app import app, forseti

__all__ = ["app", "forseti"]


@forseti.keyed(name="ticker")
class Ticker(KeyedProcess):
    """Sets, cancels and records timers as its casts say; a call returns what it handled."""

    def init(self, key: str, *args: Any) -> None:
        self.log: list[Any] = []
        self.timers: dict[str, Timer] = {}
        self.cancelled: dict[str, bool] = {}

    def handle_cast(self, msg: Any) -> None:
        op = msg.get("op") if isinstance(msg, dict) else None
        if op == "after":
            self.timers[msg["id"]] = self.send_after(msg["delay"], msg["msg"], msg.get("keep_alive", False))
        elif op == "every":
            self.timers[msg["id"]] = self.send_every(msg["interval"], msg["msg"])
        elif op == "cancel":
            self.cancelled[msg["id"]] = self.timers[msg["id"]].cancel()
        elif op == "block":
            time.sleep(msg["seconds"])
        self.log.append(["cast", msg])

    def handle_info(self, msg: Any) -> None:
        self.log.append(["info", msg, time.monotonic()])

    def handle_call(self, msg: Any) -> Any:
        if msg == "log":
            return {"log": self.log, "cancelled": self.cancelled, "now": time.monotonic()}
        if isinstance(msg, dict) and msg.get("op") == "bad":
            try:
                (self.send_every if msg["every"] else self.send_after)(msg["seconds"], "never")
            except InvalidArgument as exc:
                return f"InvalidArgument: {exc}"
            return "accepted"
        raise ValueError(msg)


@forseti.keyed(name="cast-only")
class CastOnly(KeyedProcess):
    """No handle_info: its timers' messages go to handle_cast (the default)."""

    def init(self, key: str, *args: Any) -> None:
        self.seen: list[Any] = []
        self.send_after(0.05, "from a timer")

    def handle_cast(self, msg: Any) -> None:
        self.seen.append(msg)

    def handle_call(self, msg: Any) -> Any:
        return self.seen


@forseti.keyed(name="function-timers")
def function_timers(key: str, path: str) -> None:
    """Function form: its timers come out of receive() like the casts, and are written to ``path``."""
    ticker = forseti_celery.send_every(0.05, "tick")
    send_after(0.12, "once")
    ticks = 0
    while True:
        msg = receive()
        if msg == "tick":
            ticks += 1
            if ticks == 3:
                ticker.cancel()
        with open(path, "a") as f:
            f.write(json.dumps(msg) + "\n")
