"""The test suite's worker app (``tests.app``) with keyed processes written with ``async def``."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any

import forseti_celery
from forseti_celery import KeyedProcess
from tests.app import app, forseti

__all__ = ["app", "forseti"]


def note(path: str | None, *what: Any) -> None:
    """Append a line to ``path`` (what a process says after it can no longer answer calls)."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(list(what)) + "\n")


@forseti.keyed(name="async-ordered")
class Ordered(KeyedProcess):
    """Every hook async. A call ``[client, n, pause]`` awaits ``pause`` seconds in the middle of
    its handling and answers the handling count; ``"log"`` answers what was handled, in order, with
    an entry and an exit per message (two interleaved handlers would show up there)."""

    async def init(self, key: str, *args: Any) -> None:
        await asyncio.sleep(0)
        self.log: list[Any] = []

    async def handle_call(self, msg: Any) -> Any:
        if msg == "log":
            return self.log
        if msg == "pid":
            return os.getpid()
        if isinstance(msg, dict) and "crash" in msg:
            await asyncio.sleep(0.01)
            raise ValueError(msg["crash"])
        self.log.append(["in", msg[0], msg[1]])
        await asyncio.sleep(msg[2])
        self.log.append(["out", msg[0], msg[1]])
        return len(self.log) // 2

    async def handle_cast(self, msg: Any) -> None:
        self.log.append(["in", msg[0], msg[1]])
        await asyncio.sleep(msg[2])
        self.log.append(["out", msg[0], msg[1]])


@forseti.keyed(name="async-background")
class Background(KeyedProcess):
    """A background task counting ticks every 10 ms from init; ``terminate`` and the task's
    cancellation are written to ``path`` (its first ``get_key`` argument)."""

    async def init(self, key: str, path: str) -> None:
        self.path = path
        self.ticks = 0
        self.task = self.create_task(self._tick())

    async def _tick(self) -> None:
        try:
            while True:
                await asyncio.sleep(0.01)
                self.ticks += 1
        except asyncio.CancelledError:
            note(self.path, "cancelled", self.ticks, self.terminated)
            raise

    terminated = False

    def handle_call(self, msg: Any) -> Any:  # a sync handler in an async process
        if msg == "ticks":
            return self.ticks
        if msg == "fail":  # the task fails: the process crashes
            self.create_task(self._fail())
            return "failing"
        if msg == "await-timer":  # a timer set by a task, while the loop waits
            self.create_task(self._set_timer())
            return "set"
        if msg == "infos":
            return getattr(self, "infos", [])
        raise ValueError(msg)

    async def _fail(self) -> None:
        await asyncio.sleep(0.01)
        raise KeyError("from a background task")

    async def _set_timer(self) -> None:
        await asyncio.sleep(0.05)
        self.send_after(0.05, "timer from a task")

    async def handle_info(self, msg: Any) -> None:
        self.infos = [*getattr(self, "infos", []), msg]

    async def terminate(self, reason: str) -> None:
        await asyncio.sleep(0.01)
        self.terminated = True
        note(self.path, "terminate", reason, self.task.done())


@forseti.keyed(name="async-mixed")
class Mixed(KeyedProcess):
    """Sync init and handle_cast, async handle_call, default handle_info (to the sync handle_cast);
    a timer from init."""

    def init(self, key: str, *args: Any) -> None:
        self.seen: list[Any] = []
        self.send_after(0.05, "from a timer")

    def handle_cast(self, msg: Any) -> None:
        self.seen.append(msg)

    async def handle_call(self, msg: Any) -> Any:
        await asyncio.sleep(0.001)
        if msg == "pid":
            return os.getpid()
        return self.seen


@forseti.keyed(name="async-function")
async def async_function(key: str, path: str) -> None:
    """Function form: ``areceive(timeout)``, noting each message (``None`` at a timeout) to ``path``
    until ``"stop"``; timers too."""
    forseti_celery.send_after(0.05, "tick")
    while (msg := await forseti_celery.areceive(0.3)) != "stop":
        note(path, msg)
    note(path, "returned")


@forseti.keyed(name="sync-idle")
class SyncIdle(KeyedProcess):
    """A sync process doing nothing: the memory baseline. Asked ``"async"``, it tries the async
    calls and answers what they raised."""

    def handle_call(self, msg: Any) -> Any:
        if msg == "async":
            refused = []
            for attempt in (lambda: self.create_task(asyncio.sleep(0)),
                            lambda: asyncio.run(forseti_celery.areceive(0))):
                try:
                    attempt()
                except RuntimeError as exc:
                    refused.append(str(exc))
            return refused
        return os.getpid()


@forseti.keyed(name="async-idle")
class AsyncIdle(KeyedProcess):
    """The same, async."""

    async def handle_call(self, msg: Any) -> Any:
        return os.getpid()


def _later(coro: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Run ``coro`` on ``loop`` from this thread, once the loop's own thread has gone back to waiting."""
    time.sleep(0.2)
    asyncio.run_coroutine_threadsafe(coro, loop)


@forseti.keyed(name="async-lazy")
class Lazy(KeyedProcess):
    """Async hooks; ``handle_call`` never awaits, so the process runs without building its loop
    until it uses the loop (``"soon"``, ``"task"``) or ``handle_cast`` (which awaits) runs."""

    async def init(self, key: str, *args: Any) -> None:
        self.log: list[Any] = []

    async def handle_call(self, msg: Any) -> Any:
        loop = asyncio.get_running_loop()  # already the one it will run, built or not
        if msg == "built":
            return bool(loop.built)  # type: ignore[attr-defined]
        if msg == "current":
            return asyncio.current_task() is not None
        if msg == "soon":  # a callback: it runs after this handler, on the loop built for it
            loop.call_soon(self.log.append, "soon")
        elif msg == "task":
            self.create_task(self._note("task"))
        elif isinstance(msg, list):  # ["thread", path]: another thread is the first to use the loop
            threading.Thread(target=_later, args=(self._write(msg[1]), loop)).start()
            msg = msg[0]
        self.log.append(msg)
        return list(self.log)

    async def _note(self, what: str) -> None:
        await asyncio.sleep(0)
        self.log.append(what)

    async def _write(self, path: str) -> None:
        await asyncio.sleep(0)
        note(path, "from a thread")

    async def handle_cast(self, msg: Any) -> None:
        async with asyncio.timeout(5):
            await asyncio.sleep(0.001)
        self.log.append(msg)


@forseti.keyed(name="async-movable")
class Movable(KeyedProcess):
    """Async hooks with a plain ``snapshot`` and an async ``restore`` (issue 13's handoff)."""

    async def init(self, key: str, *args: Any) -> None:
        self.members: list[Any] = []

    async def handle_cast(self, msg: Any) -> None:
        await asyncio.sleep(0.001)
        self.members.append(msg)

    async def handle_call(self, msg: Any) -> Any:
        return self.members

    def snapshot(self) -> Any:
        return {"members": self.members}

    async def restore(self, state: Any) -> None:
        await asyncio.sleep(0)
        self.members = [*state["members"], "restored"]

    async def terminate(self, reason: str) -> None:
        await asyncio.sleep(0.001)
        print(f"async terminate {reason}", flush=True)
