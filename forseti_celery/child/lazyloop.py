"""The lazy event loop of an async keyed process (:mod:`.aio`): built on first use, and the
means to start a coroutine without a loop and go on with it on one.

A process whose hooks never suspend never needs its loop: building one, and running it the first
time, copies ~0.9 MB of its worker's pages into it (CPython writes reference counts and the
specialising interpreter's counters into the objects of the code it runs), which would make an
idle async process cost ~1.3x a sync one. See ``docs/asyncio.rst``, "Memory".
"""

from __future__ import annotations

import asyncio
import dis
import threading
import types
from collections.abc import Callable, Coroutine, Generator
from types import CodeType
from typing import Any

__all__ = ["TO_LOOP", "LazyLoop", "resume", "suspends", "to_loop"]


class LazyLoop(asyncio.SelectorEventLoop):
    """asyncio's own selector loop, built on first use: until something reads one of its
    attributes (``create_future``, ``call_soon``, ``create_task``, running it...), it is an empty
    object, which costs a process none of the ~0.6 MB of its worker's pages that building a loop
    copies (CPython writes to the objects of the code it runs). :attr:`built` says whether it was."""

    def __init__(self, on_build: Callable[[], None] | None = None) -> None:
        # The loop itself is built on first use (__getattr__); ``on_build`` is called if another
        # thread than this one builds it (the loop's thread may then be waiting for a message).
        self._lazy_lock = threading.RLock()
        self._lazy_thread = threading.get_ident()
        self._lazy_on_build = on_build

    def __getattr__(self, name: str) -> Any:
        known = self.__dict__
        if name.startswith("__") or known.get("_built"):
            raise AttributeError(name)
        with known["_lazy_lock"]:  # one thread builds it; another waits for it to be built
            if known.get("_building"):  # an attribute asked while it is built: not set yet
                raise AttributeError(name)
            if not known.get("_built"):
                known["_building"] = True
                try:
                    asyncio.SelectorEventLoop.__init__(self)
                finally:
                    known["_building"] = False
                known["_built"] = True
                if threading.get_ident() != self._lazy_thread and self._lazy_on_build is not None:
                    self._lazy_on_build()
        return getattr(self, name)

    @property
    def built(self) -> bool:
        return bool(self.__dict__.get("_built"))

    def __del__(self, _warn: Any = None) -> None:
        if self.built:
            super().__del__()


#: What the body yields to go on on the loop (:func:`to_loop`).
TO_LOOP = object()


@types.coroutine
def to_loop() -> Generator[Any, None, None]:
    yield TO_LOOP


async def resume(body: Coroutine[Any, Any, None], yielded: Any) -> None:
    """The body, started without the loop and suspended at ``yielded``, on in a task."""
    await _Resumed(body, yielded)


class _Resumed:
    """An awaitable going on with a suspended coroutine: what ``await`` does, from its second step."""

    def __init__(self, coro: Coroutine[Any, Any, None], yielded: Any) -> None:
        self.coro, self.yielded = coro, yielded

    def __await__(self) -> Generator[Any, Any, None]:
        coro, yielded = self.coro, self.yielded
        try:
            if yielded is TO_LOOP:  # not started, or it only asked for the loop: go on at once
                yielded = coro.send(None)
            while True:
                try:
                    sent = yield yielded
                except GeneratorExit:
                    coro.close()
                    raise
                except BaseException as exc:  # a cancellation, thrown in by its task
                    yielded = coro.throw(exc)
                else:
                    yielded = coro.send(sent)
        except StopIteration:
            return


def suspends(code: CodeType) -> bool:
    """Whether a coroutine of ``code`` can suspend (it awaits something). Remembered per code."""
    known = _suspending.get(code)
    if known is None:
        known = _suspending[code] = not _AWAITS.isdisjoint(code.co_code[::2])
    return known


_suspending: dict[CodeType, bool] = {}
#: The opcodes of ``await``, ``async with`` and ``async for``: a coroutine without them never suspends.
_AWAITS = frozenset(dis.opmap[name] for name in ("GET_AWAITABLE", "GET_AITER", "GET_ANEXT", "BEFORE_ASYNC_WITH",
                                                 "SEND", "YIELD_VALUE") if name in dis.opmap)
