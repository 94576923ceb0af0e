"""Keyed processes written with ``async def``: an asyncio event loop in the keyed process.

A :class:`~forseti_celery.KeyedProcess` with any coroutine hook (``init``, ``handle_call``,
``handle_cast``, ``handle_info``, ``terminate``, ``snapshot``, ``restore``; sync and async ones
mixed as you like), or an ``async def`` function, runs here: :func:`serve` runs it on an event
loop in the process's main thread, where its handlers run one at a time, in order, as in a sync
process: a handler that awaits holds the next message back, while the process's background tasks
(:meth:`~forseti_celery.KeyedProcess.create_task`) run. No thread is added: the loop reads the
pipe (``add_reader``) while it waits for a message, and only then: a handler that awaits
leaves what is sent meanwhile in the pipe and the worker's mailbox, as a busy sync process
does. Timers (:func:`~forseti_celery.send_after`) come through the mailbox as
in a sync process; one set while the loop waits wakes it. See ``docs/asyncio.rst``.

The loop starts when first needed (:func:`serve`): until a hook that can suspend (one with an
``await``, ``async with`` or ``async for`` in it) is about to run, or something uses the loop
(``create_task``, a future, a callback), the process runs without it, as a sync one does, and
costs what a sync one costs; ``asyncio.get_running_loop()`` already answers the loop it will run.
"""

from __future__ import annotations

import _thread
import asyncio
import inspect
import time
from collections.abc import Callable, Coroutine
from types import CoroutineType
from typing import Any

from ..core import process
from ..core.messages import CALL, CAST, TYPE
from ..core.pipe import HANDOFF, STOP, Started
from ..core.process import KeyedProcess, Timer
from ..core.protocol import PAYLOAD
from . import runtime
from .lazyloop import TO_LOOP, LazyLoop, resume, suspends, to_loop
from .state import KeyState

__all__ = ["AioMailbox", "serve"]


#: The message that wakes :meth:`AioMailbox.get` (a one-shot timer's, in the mailbox's queue).
_WAKE = object()


class AioMailbox:
    """An async keyed process's view of its :class:`~.runtime.Mailbox`: messages awaited on the
    loop, background tasks, and (as ``core.process._mailbox``) what ``areceive``, ``create_task``
    and the timers ask of the running process."""

    def __init__(self, box: runtime.Mailbox, loop: asyncio.AbstractEventLoop) -> None:
        self.box = box
        self._loop = loop
        #: Whether the process runs on its loop (:func:`serve`); until then :meth:`get` waits as
        #: a sync process does, and nothing else runs meanwhile.
        self.looping = not isinstance(loop, LazyLoop)
        #: Set while the loop waits for a message: the pipe is read then only (:meth:`_readable`).
        self._waiter: asyncio.Future[None] | None = None
        self._reading = False  # whether the loop watches the pipe (add_reader)
        self._tasks: set[asyncio.Task[Any]] = set()  # strong references: the loop keeps weak ones
        #: The exception a background task ended with: it crashes the process (see :meth:`create_task`).
        self.failure: BaseException | None = None
        self.main: asyncio.Task[Any] | None = None
        #: Threads the process had (``_thread._count()``) before its own code ran: with more, a
        #: wait without the loop can be woken (an eventfd polled with the pipe), else it is a read.
        self.threads = _thread._count()

    def _built_elsewhere(self) -> None:
        """Another thread built the loop (``call_soon_threadsafe`` on it, given by a hook that
        never awaited): wake :meth:`get` if it waits without the loop, so that it runs it."""
        self.box.put({TYPE: runtime.INFO, "timer": Timer(0.0, _WAKE, None, False)})

    # -- the pipe, read from the loop ------------------------------------------------------------
    def _readable(self) -> None:
        """The loop's reader of the pipe: while :meth:`get` waits, the frames the pipe holds are
        read and it wakes; while a handler runs (it awaits something), the reader is taken off,
        and what is sent waits in the pipe and the worker's mailbox as in a busy sync process."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            self._loop.remove_reader(self.box.pipe.fd)
            self._reading = False
            return
        self.box.take()
        waiter.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The mailbox's next message (as :meth:`~.runtime.Mailbox.get`), awaited; ``None`` after ``timeout``."""
        box = self.box
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.looping:
            if not self._loop.built:  # type: ignore[attr-defined]
                if _thread._count() > self.threads:  # a thread of its hooks' may build the loop meanwhile
                    box.pipe.waking_on()
                msg = box.get(timeout)  # no loop yet: nothing else to run while it waits
                if msg is None or msg.get(PAYLOAD) is not _WAKE:
                    return msg
            await self.to_loop()  # the loop was used (a task, a callback...): it runs from now on
        while True:
            msg = box.ready()
            if msg is not None:
                if msg.get(PAYLOAD) is _WAKE:
                    continue
                return msg
            now = time.monotonic()
            wait = box.timers.wait(now) if box.timers.heap else None
            if deadline is not None:
                if deadline <= now:
                    msg = box.get(0.0)  # what the pipe holds now
                    return None if msg is None or msg.get(PAYLOAD) is _WAKE else msg
                wait = deadline - now if wait is None else min(wait, deadline - now)
            self._waiter = waiter = self._loop.create_future()
            if not self._reading:
                self._loop.add_reader(box.pipe.fd, self._readable)
                self._reading = True
            later = None if wait is None else self._loop.call_later(wait, self._wake)
            try:
                await waiter
            finally:
                self._waiter = None
                if later is not None:
                    later.cancel()

    async def to_loop(self) -> None:
        """Go on on the loop (:func:`serve` takes the process there), if not there yet."""
        if not self.looping:
            self.looping = True
            await to_loop()

    async def hook(self, value: Any) -> Any:
        """A hook's result, awaited if it is a coroutine (an ``async def`` hook's), else as it is;
        one that can suspend runs on the loop. (``inspect.isawaitable`` would run an ABC check,
        and copy its pages, for every plain value.)"""
        if type(value) is not CoroutineType:
            return value
        if not self.looping and suspends(value.cr_code):
            await self.to_loop()
        return await value

    # -- what the running process asks (core.process._mailbox) -----------------------------------
    def start_timer(self, delay: float, msg: Any, interval: float | None, keep_alive: bool) -> Timer:
        timer = self.box.start_timer(delay, msg, interval, keep_alive)
        self._wake()  # set by a background task while the loop waits: its wait must count it
        return timer

    def receive(self, timeout: float | None) -> Any:
        """The sync ``receive()`` in an async process: works, but blocks the loop while it waits."""
        while (msg := self.box.receive(timeout)) is _WAKE:  # (the loop built meanwhile: see get)
            pass
        return msg

    async def areceive(self, timeout: float | None) -> Any:
        """Function form: as :meth:`~.runtime.Mailbox.receive`, awaited."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            msg = await self.get(left)
            if msg is None:
                return None
            if self.box.takes(msg):
                return msg[PAYLOAD]

    def create_task(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A background task of the process: runs between and during its handlers' awaits until
        it returns or the process ends (then it is cancelled, after ``terminate``). An exception
        it ends with crashes the process, as one raised by a handler does."""
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None or self.failure is not None:
            return
        self.failure = task.exception()
        if self.main is not None:
            self.main.cancel()  # also a handler awaiting what the task was to give it

    def crashed(self, exc: BaseException) -> BaseException:
        """What the process crashed of: a background task's exception if that is why ``exc`` came."""
        return self.failure if self.failure is not None and isinstance(exc, asyncio.CancelledError) else exc


def serve(box: runtime.Mailbox, target: Any, key: str, args: list[Any], state: KeyState) -> None:
    """Run the async keyed process ``target`` (class or function) for ``key``, until it stops or
    returns; raises what crashes it, as :func:`.runtime.run` expects.

    Its body (a coroutine) runs first without a loop, as a sync process runs: a hook without an
    ``await`` in it never suspends, and the body waits for messages as a sync process does
    (:meth:`AioMailbox.get`), while ``asyncio.get_running_loop()`` answers the (not yet built)
    :class:`LazyLoop`. The first hook that can suspend, or the first use of the loop, takes the
    body onto the loop, in a task, for the rest of the process's life."""
    # Under another event-loop policy (uvloop...), its loop, built now and run from the start.
    lazy = type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy
    loop = LazyLoop() if lazy else asyncio.new_event_loop()
    aio = AioMailbox(box, loop)
    if lazy:
        loop._lazy_on_build = aio._built_elsewhere  # type: ignore[attr-defined]
    process._mailbox = aio
    try:
        body = _serve_class(aio, target, key, args, state) if isinstance(target, type) else _serve_function(
            aio, target, key, args)
        yielded: Any = TO_LOOP  # not started: resume starts it
        if not aio.looping:
            asyncio.events._set_running_loop(loop)
            try:
                yielded = body.send(None)
            except StopIteration:
                return
            finally:
                asyncio.events._set_running_loop(None)
            aio.looping = True
        aio.main = loop.create_task(resume(body, yielded))
        loop.run_until_complete(aio.main)
    finally:
        if lazy:
            box.pipe.waking_off()
        if not isinstance(loop, LazyLoop) or loop.built:
            _close(loop)


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what still runs (background tasks, after ``terminate``) and let it unwind, then close."""
    try:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


async def _serve_function(aio: AioMailbox, fn: Callable[..., Any], key: str, args: list[Any]) -> None:
    aio.box.send(Started().to_wire())
    try:
        await aio.hook(fn(key, *args))
    except asyncio.CancelledError as exc:
        raise aio.crashed(exc) from None


async def _serve_class(aio: AioMailbox, cls: type[KeyedProcess], key: str, args: list[Any],
                       state: KeyState) -> None:
    box, obj = aio.box, cls()
    init: Callable[..., Any] = obj.init  # maybe async: a coroutine to await
    terminate: Callable[[str], Any] = obj.terminate
    restore: Callable[[Any], Any] = obj.restore
    try:
        if getattr(getattr(cls.snapshot, "__code__", None), "co_flags", 0) & inspect.CO_COROUTINE:
            raise TypeError(f"{cls.__name__}.snapshot must be a plain def (restore and the handlers may be async)")
        await aio.hook(init(key, *args))
        saved = state.to_restore()  # a handoff's state, or the key's checkpoint (as a sync process)
        if saved is not None:
            await aio.hook(restore(saved))
    except BaseException as exc:
        runtime.init_failed(box, exc, state.name, key)
    box.send(Started().to_wire())
    # The default handle_info passes its message to handle_cast: an async one must be awaited.
    info = obj.handle_cast if type(obj).handle_info is KeyedProcess.handle_info else obj.handle_info
    handlers: dict[str, Callable[[Any], Any]] = {CAST: obj.handle_cast, runtime.INFO: info, CALL: obj.handle_call}
    try:
        while True:
            msg = await aio.get()
            assert msg is not None
            kind = msg[TYPE]
            if kind == STOP:
                box.stop_reason = msg.get("reason", "stop")
                state.stopping(obj, box.stop_reason)
                await aio.hook(terminate(box.stop_reason))
                state.stopped(box.stop_reason)
                return
            if kind == HANDOFF:
                deferred = _Deferred(obj)  # its snapshot now; its terminate on the loop, awaited
                box.stop_reason = state.hand_off(deferred)  # type: ignore[arg-type]
                await aio.hook(terminate(deferred.reason))
                return
            if kind == runtime.INFO and state.is_tick(msg[PAYLOAD]):
                state.auto(obj)
                continue
            await _handle(aio, handlers, msg)
            state.handled(obj)
    except asyncio.CancelledError as exc:
        raise aio.crashed(exc) from None


class _Deferred:
    """A keyed process as :meth:`KeyState.hand_off` sees it from the loop: its (plain)
    ``snapshot``, and a ``terminate`` that only notes the reason, for the loop to await."""

    def __init__(self, obj: KeyedProcess) -> None:
        self.snapshot = obj.snapshot
        self.reason = "shutdown"

    def terminate(self, reason: str) -> None:
        self.reason = reason


async def _handle(aio: AioMailbox, handlers: dict[str, Callable[[Any], Any]], msg: dict[str, Any]) -> None:
    kind = msg[TYPE]
    try:
        value = await aio.hook(handlers[kind](msg[PAYLOAD]))
    except SystemExit:
        raise  # ends the process normally, as in a sync process
    except BaseException as exc:
        if kind == CALL:
            runtime.crash_reply(aio.box, msg, aio.crashed(exc))
        raise
    if kind == CALL:
        aio.box.reply(msg, value)


async def _rehearsal(loop: asyncio.AbstractEventLoop) -> None:
    task = loop.create_task(asyncio.sleep(10))
    waiter = loop.create_future()
    loop.call_soon_threadsafe(waiter.set_result, None)
    await waiter
    later = loop.call_later(0.0001, waiter.done)
    await asyncio.sleep(0)
    later.cancel()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def rehearse() -> None:
    """Run, in the process that forks keyed processes (at import, in a worker), what an async
    keyed process runs: :data:`REHEARSALS` times a throwaway event loop, and a process whose
    hook does not await through :func:`serve` without its loop (a call, then a stop, on a
    stage). What asyncio creates and caches on first use is then shared with every child rather
    than built in each, and the code is specialised already, so a child's first run does not
    rewrite it (CPython 3.11 does after 8 calls). Measured, USS of an idle async process over a
    sync one's: on a worker, 1.13 MB without the loop's rehearsal, 0.93 MB with one, 0.86 MB
    with 16; in a forked process, 200 KB without the loop-less one, ~150 KB with it (16 times).
    See ``docs/asyncio.rst``, "Memory". Skipped under a running loop."""
    if asyncio._get_running_loop() is not None:
        return
    for _ in range(REHEARSALS):
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(_rehearsal(loop))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
    mailbox = process._mailbox
    try:
        for _ in range(REHEARSALS):
            stage = _Stage()
            serve(stage, _Rehearsed, "", [], stage)  # type: ignore[arg-type]
    finally:
        process._mailbox = mailbox


#: How many times :func:`rehearse` runs each rehearsal: past CPython 3.11's warm-up (8 calls).
REHEARSALS = 16


class _Rehearsed(KeyedProcess):
    async def handle_call(self, msg: Any) -> Any:
        return msg


class _Stage:
    """A mailbox and a key state, as :func:`serve` sees them, for :func:`rehearse`: a call, a stop."""

    name = ""
    stop_reason = None

    def __init__(self) -> None:
        self.pipe = self  # its pipe: waking_on and waking_off do nothing
        self.msgs: list[dict[str, Any]] = [{TYPE: CALL, PAYLOAD: None}, {TYPE: STOP, "reason": ""}]

    def get(self, timeout: float | None = None) -> dict[str, Any]:
        return self.msgs.pop(0)

    def waking_on(self) -> None: ...
    def waking_off(self) -> None: ...
    def send(self, msg: Any) -> None: ...
    def reply(self, request: Any, value: Any = None) -> None: ...
    def to_restore(self) -> None: ...
    def handled(self, obj: Any) -> None: ...
    def stopping(self, obj: Any, reason: str) -> None: ...
    def stopped(self, reason: str) -> None: ...

    def is_tick(self, msg: Any) -> bool:
        return False


runtime.serve_async = serve
rehearse()
