"""The keyed process itself: the code that runs in a billiard child forked by a worker.

The child talks only to its worker, over a pipe: no broker connection of its own,
which keeps creation at fork cost and memory at the pages the child touches.
A reader thread moves frames from the pipe into the mailbox at once, so a busy
callback never makes the worker block on a full pipe. A frame holds messages
as a broker message does (see :mod:`~forseti_celery.core.protocol`): the payload of
a cast or call comes as its sender encoded it, and is decoded here, where it is
used; a reply's value leaves encoded here, and only its caller decodes it. The child dies with its
worker: ``PR_SET_PDEATHSIG`` and end-of-file on the pipe both end it.
"""

from __future__ import annotations

import _thread
import collections
import gc
import os
import queue
import time
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import billiard
from celery.utils.log import get_logger

from ..core import process
from ..core.conf import ChildConfig
from ..core.errors import InvalidMessage
from ..core.messages import CORR, REPLY_TO, TYPE, Call, Reply
from ..core.pipe import ASSIGN, HANDOFF, STOP, Assign, Exit, InitError, Started, Touch
from ..core.process import KeyedProcess, Timer
from ..core.protocol import CALL, CAST, PAYLOAD, decode, decode_payloads, encode, encode_message
from .lifeline import FENCED, Lifeline, become_keyed, detach
from .state import KeyState
from .state import qualname as _qualname
from .timers import Timers

logger = get_logger(__name__)

__all__ = ["FENCED", "INFO", "Lifeline", "Mailbox", "become_keyed", "detach", "mailbox", "run"]

_STOP = object()
#: What else a worker sends a keyed process: a malformed rest is dropped.
_OTHERS = frozenset({ASSIGN, STOP, HANDOFF})
#: The kind of a timer's message in the mailbox. Never on the pipe: one that came from it is dropped.
INFO = "info"
#: Seconds between two ``touch`` messages at most (keep_alive timers firing faster say nothing new).
TOUCH_EVERY = 1.0


class Mailbox:
    """The child's end of the pipe: incoming messages queued in order, answers sent back; and the
    process's timers, whose messages join that order as they come due."""

    def __init__(self, conn: Any, lifeline: Lifeline, watch_lifeline: bool = True,
                 max_size: int = ChildConfig.max_message_size, *, reader: bool = True) -> None:
        """``reader=False``: no reader thread; :meth:`take` moves each frame (a rehearsal's stage)."""
        self._conn = conn
        self._lifeline = lifeline
        self._watch = watch_lifeline
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        #: Messages taken off the queue ahead of their turn, with the timer messages due after them.
        self._ready: collections.deque[dict[str, Any]] = collections.deque()
        self.timers = Timers()
        self._touched = -TOUCH_EVERY  # when the last touch went to the worker (time.monotonic())
        self.stop_reason: str | None = None
        #: forseti_max_message_size: the largest reply sent (see :meth:`reply`).
        self.max_size = max_size
        self.key = ""
        #: Called by the reader thread after it queued a frame's messages (an async process's
        #: loop, :mod:`.aio`, sets it to wake itself); ``None`` in a sync process.
        self.notify: Callable[[], None] | None = None
        # A bare thread: ``threading.Thread`` costs a keyed process ~80 more page faults (copies of
        # pages it shares with its parent) for bookkeeping nothing here uses; it ends with the process.
        if reader:
            _thread.start_new_thread(self._read, ())

    def _read(self) -> None:
        check = self._lifeline.check_every if self._watch else None  # None: the zygote watches it
        next_check = time.monotonic() + (check or 0.0)
        try:
            while True:
                ready = self._conn.poll(check)
                now = time.monotonic()
                if check is not None and now >= next_check:  # also under a steady stream of messages
                    next_check = now + check
                    if self._lifeline.cut_off():
                        os._exit(FENCED)  # fenced: our key may be given to another worker soon
                if ready:
                    self.take()
        except (EOFError, OSError):
            # The worker is gone: a keyed process never outlives its worker.
            os._exit(1)

    def take(self) -> None:
        """Read one frame off the pipe and queue its messages (the reader thread's work)."""
        batch = decode(self._conn.recv_bytes(), routed=False)
        decode_payloads(batch)
        for msg in batch:
            self._queue.put(msg)
        if self.notify is not None:
            self.notify()

    def rehearse(self) -> None:
        """Run once, on a pipe of its own, what taking a key runs (a frame received, decoded and
        queued, an answer encoded and sent), while this process waits as a spare: the pages that
        code touches are copied from the parent now, not while a caller waits for ``started``
        (about half a millisecond per new key here)."""
        ours, theirs = billiard.Pipe(duplex=True)
        box: queue.SimpleQueue[Any] = queue.SimpleQueue()  # not ours: the real assign may be in it
        try:
            ours.send_bytes(encode([Assign("", "", []).to_wire()]))
            if theirs.poll(1.0):
                batch = decode(theirs.recv_bytes(), routed=False)
                decode_payloads(batch)
                for msg in batch:
                    box.put(msg)
                box.get()
            theirs.send_bytes(encode([Started().to_wire()]))
            ours.recv_bytes()
        finally:
            ours.close()
            theirs.close()

    def put(self, msg: dict[str, Any]) -> None:
        """Queue ``msg`` behind what the reader thread has queued (from any thread: :mod:`.aio`)."""
        self._queue.put(msg)

    def start_timer(self, delay: float, msg: Any, interval: float | None, keep_alive: bool) -> Timer:
        """A timer whose ``msg`` joins the mailbox in ``delay`` seconds (then every ``interval``)."""
        return self.timers.add(time.monotonic() + delay, msg, interval, keep_alive)

    def _next(self, deadline: float | None) -> dict[str, Any] | None:
        """The next message in order, a timer's included, or ``None`` at ``deadline``. A timer due
        goes after every message already queued (they came first); with no timer set, the wait
        is the queue's alone: an idle process without timers never wakes up."""
        while True:
            if self._ready:
                return self._ready.popleft()
            wait = None
            if self.timers.heap:
                now = time.monotonic()
                fired = self.timers.due(now)
                if fired:
                    self._fire(fired, now)
                    continue
                wait = self.timers.wait(now)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    try:
                        return self._queue.get_nowait()  # type: ignore[no-any-return]
                    except queue.Empty:
                        return None
                wait = left if wait is None else min(wait, left)
            try:
                return self._queue.get(timeout=wait)  # type: ignore[no-any-return]
            except queue.Empty:
                continue  # a timer is due, or the deadline has come: the loop says which

    def _fire(self, fired: list[Timer], now: float) -> None:
        while True:  # what the reader queued before these came due goes first
            try:
                self._ready.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for timer in fired:
            self._ready.append({TYPE: INFO, "timer": timer})
        if now - self._touched >= TOUCH_EVERY and any(t.keep_alive for t in fired):
            self._touched = now
            self.send(Touch().to_wire())

    def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Next protocol message, its payload decoded (by the reader thread), or ``None`` after
        ``timeout``; a timer's message as ``{TYPE: INFO, PAYLOAD: msg}``. A cast or call whose
        payload is no JSON (forged: the worker forwards payloads undecoded) or that has none is
        dropped and logged; a call is answered :class:`InvalidMessage` (if it says where to). A
        message of another type is dropped and logged too."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._ready or self.timers.heap:
                msg = self._next(deadline)
                if msg is None:
                    return None
            else:  # no timer: the queue alone, as before timers (through _next a get cost +0.25 us)
                try:
                    msg = self._queue.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    return None
            kind = msg.get(TYPE)
            if kind != CAST and kind != CALL:
                timer = msg.get("timer") if kind == INFO else None
                if isinstance(timer, Timer):
                    if not timer.active:
                        continue  # cancelled after it came due, before its turn
                    if timer.interval is None:
                        timer.cancel()  # a one-shot is handled once: cancelling it now does nothing
                    return {TYPE: INFO, PAYLOAD: timer.msg}
                if type(kind) is str and kind in _OTHERS:
                    return msg
                logger.warning("forseti: keyed process %r (pid %d) dropped a message of type %r", self.key,
                               os.getpid(), kind)
                continue
            value = msg.get(PAYLOAD, _STOP)
            if kind == CALL and not (type(msg.get(REPLY_TO)) is str and type(msg.get(CORR)) is str):
                logger.warning("forseti: keyed process %r (pid %d) dropped a call with no one to answer",
                               self.key, os.getpid())
                continue
            if value is _STOP:
                error = f"{kind} without a message"
            elif isinstance(value, InvalidMessage):
                error = str(value)
            else:
                return msg
            logger.warning("forseti: keyed process %r (pid %d) dropped a %s: %s", self.key, os.getpid(), kind, error)
            if kind == CALL:
                self.reply(msg, error="invalid", exc_type="InvalidMessage", text=error)

    def send(self, msg: dict[str, Any]) -> None:
        """Report to the worker."""
        self._conn.send_bytes(encode([msg]))

    def reply(self, request: dict[str, Any], value: Any = None, error: str | None = None, exc_type: str = "",
              text: str = "") -> None:
        """Answer a call with ``value``, or with the ``error`` kind (the remote exception's
        ``exc_type`` and ``text``); the worker forwards it to the caller's reply queue. An answer
        that cannot be sent (not JSON, nested too deep, larger than forseti_max_message_size) is
        logged and the caller gets :class:`InvalidMessage` saying why; the process lives on."""
        to, corr = Call.caller(request)
        try:
            if error is None:  # the value travels as a payload: the worker forwards it undecoded
                data = encode_message(Reply(corr, reply_to=to).to_wire(), "reply", self.max_size, payload=value).data
            else:
                data = encode_message(Reply(corr, error=error, text=text, exc_type=exc_type, reply_to=to).to_wire(),
                                      "reply", self.max_size).data
        except InvalidMessage as exc:
            logger.warning("forseti: keyed process %r (pid %d) could not answer a call: %s", self.key, os.getpid(), exc)
            invalid = Reply(corr, error="invalid", text=str(exc), exc_type="InvalidMessage", reply_to=to)
            data = encode_message(invalid.to_wire(), "reply", self.max_size).data
        self._conn.send_bytes(data)

    def receive(self, timeout: float | None) -> Any:
        """Function form: the next cast's (or timer's) payload, or ``None``; calls are refused."""
        while True:
            msg = self.get(timeout)
            if msg is None:
                return None
            if self.takes(msg):
                return msg[PAYLOAD]

    def takes(self, msg: dict[str, Any]) -> bool:
        """Function form: whether ``msg`` (from :meth:`get`) is one for the function (a cast's or a
        timer's); a stop raises :class:`SystemExit`, a call is refused."""
        kind = msg[TYPE]
        if kind == CAST or kind == INFO:
            return True
        if kind == STOP:
            self.stop_reason = msg.get("reason", "stop")
            raise SystemExit(0)
        if kind == CALL:
            self.reply(msg, error="invalid", exc_type="TypeError",
                       text="function-form keyed processes take no calls; use send()")
        return False


def mailbox() -> Mailbox:
    """The running keyed process's mailbox; only valid inside a keyed process."""
    box = process._mailbox
    if not isinstance(box, Mailbox):
        raise RuntimeError("forseti_celery.receive() is only available inside a keyed process")
    return box


def run(conn: Any, config: ChildConfig, lifeline: Lifeline, resolve: Callable[[str], Any], parent_pid: int,
        close_fds: Iterable[int], start: tuple[Any, str, list[Any]] | None = None, *,
        from_zygote: bool = False, assign: Assign | None = None) -> None:
    """Entry point of a keyed process (runs after the fork): ``start`` is its ``(target, key,
    args)``, and ``assign`` (optional) the rest of its start order (a handoff's state, the
    incarnation's epoch and sid); a spare (``start`` None) waits for its key first: an
    :class:`~..core.pipe.Assign` message naming the keyed-process name, key and args (and the
    same rest). ``config`` is the worker's, inherited with the fork. With a zygote for parent
    (``from_zygote``), its signal handling is already the keyed process's, and the zygote looks
    at the lifeline for it."""
    # Everything inherited from the worker stays out of this process's collections: a collection
    # would touch (and so copy) every inherited page. Collection itself stays on for what the keyed
    # process allocates (a zygote, the parent of spares, runs with it off).
    gc.freeze()
    gc.enable()
    detach(parent_pid, close_fds, signals=not from_zygote)
    if lifeline.cut_off():
        os._exit(FENCED)  # forked by a worker that has just stopped hearing the broker: too late to start
    box = process._mailbox = Mailbox(conn, lifeline, watch_lifeline=not from_zygote,
                                     max_size=config.max_message_size)
    if start is not None:
        target, key, args = start
    else:
        box.rehearse()
        order = box.get()
        assert order is not None and order[TYPE] == ASSIGN, order
        assign = Assign.from_wire(order)
        key, args, target = assign.key, assign.args, resolve(assign.name)
        billiard.current_process().name = f"forseti:{assign.name}"
        if lifeline.cut_off():
            os._exit(FENCED)
    name = billiard.current_process().name.removeprefix("forseti:")  # as its forker named it
    box.key = key
    state = KeyState(box, config, target, assign if assign is not None else Assign(name, key, args))
    is_class = isinstance(target, type) and issubclass(target, KeyedProcess)
    try:
        if serve_async is not None and process.is_async(target):
            serve_async(box, target, key, args, state)  # child/aio.py: on an event loop
        elif is_class:
            serve(box, target, key, args, state)
        else:
            box.send(Started().to_wire())
            target(key, *args)
    except SystemExit as exc:
        # A keyed process may end itself with sys.exit(): no crash, the reason says how.
        if box.stop_reason is None and exc.code not in (None, 0):
            box.stop_reason = f"exit {exc.code!r}"
    except BaseException as exc:
        # Logged here, where the traceback is: the handlers are the worker's (inherited), so is the log.
        logger.exception("forseti: keyed process %r (name %r) crashed", key, name)
        box.send(Exit(f"crash: {_describe(exc)}").to_wire())
        os._exit(1)
    box.send(Exit(box.stop_reason or "normal").to_wire())


def serve(box: Mailbox, cls: type[KeyedProcess], key: str, args: list[Any], state: KeyState) -> None:
    """Run a keyed-process class: ``init``, ``started``, then its messages in order until a stop."""
    obj = cls()
    name = state.name
    try:
        obj.init(key, *args)
        state.start(obj)  # restore(state) after init: a handoff's state, or the key's checkpoint
    except BaseException as exc:
        init_failed(box, exc, name, key)
    box.send(Started().to_wire())
    handlers: dict[str, Callable[[dict[str, Any]], None]] = {
        CAST: lambda m: obj.handle_cast(m[PAYLOAD]),
        INFO: lambda m: obj.handle_info(m[PAYLOAD]),
        CALL: lambda m: box.reply(m, obj.handle_call(m[PAYLOAD])),
    }
    while True:
        msg = box.get()
        assert msg is not None
        kind = msg[TYPE]
        if kind == STOP:
            box.stop_reason = msg.get("reason", "stop")
            state.stopping(obj, box.stop_reason)
            obj.terminate(box.stop_reason)
            state.stopped(box.stop_reason)
            return
        if kind == HANDOFF:
            box.stop_reason = state.hand_off(obj)
            return
        if kind == INFO and state.is_tick(msg[PAYLOAD]):
            state.auto(obj)
            continue
        try:
            handlers[kind](msg)
            state.handled(obj)
        except SystemExit:
            raise  # ends the process normally (see run); the caller learns it exited
        except BaseException as exc:
            # KeyboardInterrupt, GeneratorExit, ... crash it as any exception does: the caller
            # gets RemoteError with the type, not a bare ProcessGone.
            if kind == CALL:
                crash_reply(box, msg, exc)
            raise


def init_failed(box: Mailbox, exc: BaseException, name: str, key: str) -> NoReturn:
    """``init`` raised ``exc``: logged, the worker told (its caller gets StartError), the process ends."""
    logger.exception("forseti: init of keyed process %r (name %r) raised; the caller gets StartError", key, name,
                     exc_info=exc)
    box.send(InitError(_qualname(exc), str(exc)).to_wire())
    os._exit(1)


def crash_reply(box: Mailbox, request: dict[str, Any], exc: BaseException) -> None:
    """Answer the call ``request`` whose handler crashed the process with ``exc`` (RemoteError)."""
    box.reply(request, error="crash", exc_type=_qualname(exc), text=str(exc))


#: Runs an ``async def`` keyed process (:func:`.aio.serve`, which sets it: :mod:`.aio` imports this
#: module, and the package imports :mod:`.aio`); ``None`` until then.
serve_async: Callable[[Mailbox, Any, str, list[Any], KeyState], None] | None = None


def _describe(exc: BaseException) -> str:
    return f"{_qualname(exc)}: {exc}"
