"""The keyed process itself: the code that runs in a billiard child forked by a worker.

The child talks only to its worker, over a pipe: no broker connection of its own,
which keeps creation at fork cost and memory at the pages the child touches.
No thread of its own reads the pipe: the main thread reads it when it waits for its next
message (:mod:`.pipe_end`), so a message to an idle process is handled on the thread that
read it; a busy process's messages wait in the pipe and in its worker's bounded mailbox (the
worker never blocks on a full pipe: its ends are non-blocking). A frame holds messages
as a broker message does (see :mod:`~forseti_celery.core.protocol`): the payload of
a cast or call comes as its sender encoded it, and is decoded here, where it is
used; a reply's value leaves encoded here, and only its caller decodes it. The child dies with its
worker: ``PR_SET_PDEATHSIG`` and end-of-file on the pipe both end it.
"""

from __future__ import annotations

import _socket
import collections
import gc
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import billiard
from celery.utils.log import get_logger

from ..core import process
from ..core.codec import encode_reply
from ..core.conf import ChildConfig
from ..core.errors import InvalidMessage
from ..core.messages import CORR, REPLY_TO, TYPE, Call, Reply
from ..core.pipe import ASSIGN, HANDOFF, STOP, Assign, Exit, InitError, Started, Touch
from ..core.process import KeyedProcess, Timer
from ..core.protocol import CALL, CAST, PAYLOAD, encode, encode_message
from .lifeline import FENCED, Lifeline, become_keyed, detach
from .pipe_end import PipeEnd
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


#: The frame of :meth:`Mailbox.rehearse`'s assign, encoded once in the worker: a spare encoding
#: it would copy the pages of that code, which taking a key never runs.
_STAGE_ASSIGN = (lambda body: len(body).to_bytes(4, "big") + body)(encode([Assign("", "", []).to_wire()]))


class Mailbox:
    """The child's end of the pipe: incoming messages in order, answers sent back; and the
    process's timers, whose messages join that order as they come due.

    No thread reads the pipe: the thread waiting for the next message (:meth:`get`, the process's
    main thread) reads it then, whole frames, and queues what a frame holds past that message. A
    busy process leaves what is sent to it in the pipe and its worker's bounded mailbox."""

    def __init__(self, conn: Any, max_size: int = ChildConfig.max_message_size) -> None:
        self.pipe = PipeEnd(conn)
        self._conn = conn  # its billiard Connection, as before (tests/app.py's Halfway writes to its descriptor)
        #: Messages read off the pipe and not yet handled, with the timer messages due after them.
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self.timers = Timers()
        self._touched = -TOUCH_EVERY  # when the last touch went to the worker (time.monotonic())
        self.stop_reason: str | None = None
        #: forseti_max_message_size: the largest reply sent (see :meth:`reply`).
        self.max_size = max_size
        self.key = ""

    def take(self) -> None:
        """Read what the pipe holds, whole frames (waiting until it holds something), and queue
        their messages. End-of-file (the worker is gone) ends the process."""
        try:
            batch = self.pipe.read()
        except (EOFError, OSError):
            os._exit(1)  # a keyed process never outlives its worker
        self._queue.extend(batch)

    def _pull(self, wait: float | None) -> None:
        """Take what the pipe holds within ``wait`` seconds (``None``: until it holds something)."""
        if wait is None and not self.pipe.waking:
            self.take()  # the usual wait: one read, no poll
        elif self.pipe.wait(wait):
            self.take()

    def rehearse(self) -> None:
        """Run once, on a socket pair of its own, what taking a key runs (a frame read, decoded
        and queued, an answer encoded and written), while this process waits as a spare: the
        pages that code touches are copied from the parent now, not while a caller waits for
        ``started`` (about half a millisecond per new key here). Nothing else: what only the
        rehearsal ran would be copied for nothing (billiard's ``Pipe`` cost 0.1 MiB a process)."""
        ours, theirs = _socket.socketpair()  # no Python socket objects: what they touch would be copied too
        try:
            stage = Mailbox(theirs)  # not ours: the real assign may be in our pipe
            os.write(ours.fileno(), _STAGE_ASSIGN)
            order = stage.get()  # in the pipe already: read at once
            assert order is not None
            Assign.from_wire(order)  # as run() reads its key's
            stage.send(Started().to_wire())
            os.read(ours.fileno(), 4096)
        finally:
            ours.close()
            theirs.close()

    def put(self, msg: dict[str, Any]) -> None:
        """Queue ``msg`` behind what is queued, from another thread (:mod:`.aio`, once
        :meth:`PipeEnd.waking_on` was called): a wait for the next message wakes up."""
        self._queue.append(msg)
        self.pipe.wake()

    def start_timer(self, delay: float, msg: Any, interval: float | None, keep_alive: bool) -> Timer:
        """A timer whose ``msg`` joins the mailbox in ``delay`` seconds (then every ``interval``)."""
        return self.timers.add(time.monotonic() + delay, msg, interval, keep_alive)

    def _ready(self) -> dict[str, Any] | None:
        """The next message already read (a timer's, if one is due), or ``None``; never waits."""
        if self.timers.heap:
            now = time.monotonic()
            fired = self.timers.due(now)
            if fired:
                self._fire(fired, now)
        return self._queue.popleft() if self._queue else None

    def _next(self, deadline: float | None) -> dict[str, Any] | None:
        """The next message in order, a timer's included, or ``None`` at ``deadline``. A timer due
        goes after every message sent before it came due; with no timer set, the wait is the
        pipe's alone: an idle process without timers never wakes up."""
        while True:
            msg = self._ready()
            if msg is not None:
                return msg
            wait = self.timers.wait(time.monotonic()) if self.timers.heap else None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._pull(0.0)  # what the pipe holds now
                    return self._queue.popleft() if self._queue else None
                wait = left if wait is None else min(wait, left)
            self._pull(wait)

    def _fire(self, fired: list[Timer], now: float) -> None:
        self._pull(0.0)  # what was sent before these came due goes first
        for timer in fired:
            self._queue.append({TYPE: INFO, "timer": timer})
        if now - self._touched >= TOUCH_EVERY and any(t.keep_alive for t in fired):
            self._touched = now
            self.send(Touch().to_wire())

    def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Next protocol message, its payload decoded, or ``None`` after ``timeout``; a timer's
        message as ``{TYPE: INFO, PAYLOAD: msg}``. A cast or call whose payload is no JSON
        (forged: the worker forwards payloads undecoded) or that has none is dropped and logged;
        a call is answered :class:`InvalidMessage` (if it says where to). A message of another
        type is dropped and logged too."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            msg = self._queue.popleft() if self._queue and not self.timers.heap else self._next(deadline)
            if msg is None:
                return None
            msg = self._vet(msg)
            if msg is not None:
                return msg

    def ready(self) -> dict[str, Any] | None:
        """As :meth:`get`, from what is read already (and the timers due): ``None`` rather than
        wait or read the pipe (an async process's loop waits for it, :mod:`.aio`)."""
        while (msg := self._ready()) is not None:
            if (msg := self._vet(msg)) is not None:
                return msg
        return None

    def _vet(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """``msg`` as :meth:`get` returns it, or ``None`` if dropped (see :meth:`get`)."""
        kind = msg.get(TYPE)
        if kind != CAST and kind != CALL:
            timer = msg.get("timer") if kind == INFO else None
            if isinstance(timer, Timer):
                if not timer.active:
                    return None  # cancelled after it came due, before its turn
                if timer.interval is None:
                    timer.cancel()  # a one-shot is handled once: cancelling it now does nothing
                return {TYPE: INFO, PAYLOAD: timer.msg}
            if type(kind) is str and kind in _OTHERS:
                return msg
            logger.warning("forseti: keyed process %r (pid %d) dropped a message of type %r", self.key,
                           os.getpid(), kind)
            return None
        value = msg.get(PAYLOAD, _STOP)
        if kind == CALL and not (type(msg.get(REPLY_TO)) is str and type(msg.get(CORR)) is str):
            logger.warning("forseti: keyed process %r (pid %d) dropped a call with no one to answer",
                           self.key, os.getpid())
            return None
        if value is _STOP:
            error = f"{kind} without a message"
        elif isinstance(value, InvalidMessage):
            error = str(value)
        else:
            return msg
        logger.warning("forseti: keyed process %r (pid %d) dropped a %s: %s", self.key, os.getpid(), kind, error)
        if kind == CALL:
            self.reply(msg, error="invalid", exc_type="InvalidMessage", text=error)
        return None

    def send(self, msg: dict[str, Any]) -> None:
        """Report to the worker."""
        self.pipe.write(encode([msg]))

    def reply(self, request: dict[str, Any], value: Any = None, error: str | None = None, exc_type: str = "",
              text: str = "") -> None:
        """Answer a call with ``value``, or with the ``error`` kind (the remote exception's
        ``exc_type`` and ``text``); the worker forwards it to the caller's reply queue. An answer
        that cannot be sent (not JSON, nested too deep, larger than forseti_max_message_size) is
        logged and the caller gets :class:`InvalidMessage` saying why; the process lives on."""
        to, corr = Call.caller(request)
        try:
            if error is None:  # the value travels as a payload: the worker forwards it undecoded
                # (no Reply built: a fresh keyed process would copy the pages of the dataclass's code)
                data = encode_reply(to, corr, value, self.max_size).data
            else:
                data = encode_message(Reply(corr, error=error, text=text, exc_type=exc_type, reply_to=to).to_wire(),
                                      "reply", self.max_size).data
        except InvalidMessage as exc:
            logger.warning("forseti: keyed process %r (pid %d) could not answer a call: %s", self.key, os.getpid(), exc)
            invalid = Reply(corr, error="invalid", text=str(exc), exc_type="InvalidMessage", reply_to=to)
            data = encode_message(invalid.to_wire(), "reply", self.max_size).data
        self.pipe.write(data)

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
    if not from_zygote:
        lifeline.watch()  # a zygote looks at it for its spares; a fork of the worker looks itself
    box = process._mailbox = Mailbox(conn, max_size=config.max_message_size)
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
