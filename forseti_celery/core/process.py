"""What users write: :class:`KeyedProcess` (the gen_server form), :func:`receive` (for the
function form), and the timers a keyed process sends itself (:func:`send_after`,
:func:`send_every`, :class:`Timer`)."""

from __future__ import annotations

import inspect
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .conf import MAX_TIMEOUT, checked_timeout
from .errors import InvalidArgument

if TYPE_CHECKING:
    import asyncio

T = TypeVar("T")

__all__ = ["KeyedProcess", "Timer", "areceive", "is_async", "is_movable", "receive", "send_after", "send_every"]


class KeyedProcess:
    """Base class of a keyed process in gen_server form; every hook is optional.

    One instance lives in its own child process for as long as the key's process
    lives. Its attributes belong to your code. Callbacks run one at a time, in the
    order messages arrive. An exception in ``handle_call``/``handle_cast``/``handle_info``
    crashes the process (as in OTP): its key is freed and a waiting caller gets a
    :class:`~forseti_celery.RemoteError`; so does any ``BaseException``
    (``KeyboardInterrupt``, ``GeneratorExit``) but :class:`SystemExit`, which ends the
    process normally (as ``exit(normal)``): a waiting caller gets
    :class:`~forseti_celery.ProcessGone`.
    """

    def init(self, key: str, *args: Any) -> None:
        """Runs first, in the child: ``key``, then the ``args`` given to ``get_key``.

        ``get_key`` returns once it has returned; if it raises, ``get_key`` raises
        :class:`~forseti_celery.StartError` and nothing stays registered.
        """

    def handle_call(self, msg: Any) -> Any:
        """Answers ``ref.call(msg)``; the JSON-serialisable return value is the answer."""
        raise NotImplementedError(f"{type(self).__name__} does not handle calls")

    def handle_cast(self, msg: Any) -> None:
        """Receives ``ref.send(msg)``; nothing is answered."""

    def handle_info(self, msg: Any) -> None:
        """Receives the messages of this process's timers (:meth:`send_after`, :meth:`send_every`),
        in order with its other messages. The default passes ``msg`` to :meth:`handle_cast`."""
        self.handle_cast(msg)

    def terminate(self, reason: str) -> None:
        """Runs when the process is stopped (``ref.stop()``, warm shutdown, ``"idle"`` after
        passivation); ``reason`` says why."""

    def snapshot(self) -> Any:
        """The process's state, JSON-able (any size). A class that defines it is *movable*
        (:func:`is_movable`): a warm shutdown hands its state to a new process of the key on another
        worker, a rebalance moves it, and checkpoints (:meth:`checkpoint`, ``forseti_checkpoint_every``)
        store it. Runs after the messages sent before the handoff was asked for. ``None`` means
        nothing to restore. See :doc:`/state`."""
        raise NotImplementedError(f"{type(self).__name__} defines no snapshot(): it is not movable")

    def restore(self, state: Any) -> None:
        """Runs after :meth:`init` (same key and args) when the process starts with a state: a
        handoff's :meth:`snapshot`, else its key's last checkpoint (``forseti_state_url``). If it
        raises, the start fails as if ``init`` had raised (:class:`~forseti_celery.StartError`).
        The default raises: a movable class defines both."""
        raise NotImplementedError(f"{type(self).__name__} defines snapshot() but no restore()")

    def checkpoint(self) -> bool:
        """Store :meth:`snapshot` now as this key's checkpoint (in Redis at ``forseti_state_url``):
        True; False if refused because a newer process of this key exists (this one is stale:
        it should end). Raises :class:`~forseti_celery.ConfigurationError` without
        ``forseti_state_url`` or in a class that is not movable, and
        :class:`~forseti_celery.StateUnavailable` when Redis fails. See :doc:`/state`."""
        if _state is None:
            raise RuntimeError("checkpoint() is only available inside a keyed process")
        return _state.checkpoint(self)

    def send_after(self, delay: float, msg: Any, keep_alive: bool = False) -> Timer:
        """See :func:`forseti_celery.send_after`: ``msg`` to :meth:`handle_info` in ``delay`` seconds."""
        return send_after(delay, msg, keep_alive)

    def send_every(self, interval: float, msg: Any, keep_alive: bool = False) -> Timer:
        """See :func:`forseti_celery.send_every`: ``msg`` to :meth:`handle_info` every ``interval``
        seconds, until cancelled."""
        return send_every(interval, msg, keep_alive)

    def create_task(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """In an async keyed process (one with an ``async def`` hook): run ``coro`` as a background
        task of this process, on its loop, while and between its handlers; it is cancelled when the
        process ends (after :meth:`terminate`), and an exception it raises crashes the process.
        :class:`RuntimeError` in a sync process or outside one (``coro`` is closed). See :doc:`/asyncio`."""
        create = getattr(_mailbox, "create_task", None)
        if create is None:
            coro.close()
            if _mailbox is None:
                _running("KeyedProcess.create_task")  # raises: not in a keyed process
            raise RuntimeError("create_task() needs an async keyed process: give it an async def hook")
        return create(coro)  # type: ignore[no-any-return]


class Timer:
    """A timer of the running keyed process (:func:`send_after`, :func:`send_every`). It lives in
    the process's mailbox loop (no thread, no broker) and dies with the process."""

    __slots__ = ("_live", "_on_cancel", "due", "interval", "keep_alive", "msg")

    def __init__(self, due: float, msg: Any, interval: float | None, keep_alive: bool,
                 on_cancel: Any = None) -> None:
        #: When it is next due, in ``time.monotonic()`` seconds.
        self.due = due
        #: What it sends: the object given, not a copy (it never leaves the process).
        self.msg = msg
        #: Seconds between two messages of :func:`send_every`; ``None`` for :func:`send_after`.
        self.interval = interval
        #: Whether its messages count as activity for passivation (``forseti_idle_timeout``).
        self.keep_alive = keep_alive
        self._live = True
        self._on_cancel = on_cancel

    @property
    def active(self) -> bool:
        """Whether a message of it may still be handled: not cancelled, and a one-shot not handled yet."""
        return self._live

    def cancel(self) -> bool:
        """No message of this timer is handled after this returns, not even one already due and
        waiting behind other messages. Idempotent: True if it was active, else (cancelled
        before, or a one-shot already handled) False, and nothing happens."""
        if not self._live:
            return False
        self._live = False
        if self._on_cancel is not None:
            self._on_cancel(self)
        return True

    def __repr__(self) -> str:
        kind = "once" if self.interval is None else f"every {self.interval:g}s"
        return f"<Timer {kind} {self.msg!r}{'' if self._live else ' (inactive)'}>"


def receive(timeout: float | None = None) -> Any:
    """In a function-form keyed process: the next message sent to it (or a message of one of its
    timers: :func:`send_after`, :func:`send_every`), or ``None`` after ``timeout``.

    When the process is asked to stop (``ref.stop()``, warm shutdown, and passivation after
    ``idle_timeout``: the same stop with the reason ``"idle"``), this raises :class:`SystemExit`
    so the function unwinds (``finally`` blocks run). ``timeout`` is ``None``
    (wait as long as it takes) or a number of seconds from 0 to
    :data:`~forseti_celery.core.conf.MAX_TIMEOUT`, else :class:`~forseti_celery.InvalidArgument`.
    """
    return _running("receive").receive(checked_timeout(timeout, None, zero=True))


async def areceive(timeout: float | None = None) -> Any:
    """:func:`receive` for an ``async def`` function-form keyed process: awaits the next message
    (the process's background tasks run meanwhile). :class:`RuntimeError` in a sync process. See
    :doc:`/asyncio`."""
    take = getattr(_running("areceive"), "areceive", None)
    if take is None:
        raise RuntimeError("forseti_celery.areceive() is for async def keyed processes; use receive()")
    return await take(checked_timeout(timeout, None, zero=True))


def is_async(target: Any) -> bool:
    """Whether the keyed-process ``target`` runs on an event loop: an ``async def`` function, or
    a :class:`KeyedProcess` with at least one ``async def`` hook. Remembered per target: asked
    as a target is registered (in the worker, before any fork), a keyed process finds the answer
    without running ``inspect``'s code, which would copy ~180 KB of its worker's pages into it."""
    known = _async_targets.get(target)
    if known is None:
        if isinstance(target, type):
            known = issubclass(target, KeyedProcess) and any(
                inspect.iscoroutinefunction(getattr(target, hook, None)) for hook in _HOOKS)
        else:
            known = inspect.iscoroutinefunction(target)
        _async_targets[target] = known
    return known


_HOOKS = ("init", "handle_call", "handle_cast", "handle_info", "terminate", "snapshot", "restore")
_async_targets: dict[Any, bool] = {}


def is_movable(target: Any) -> bool:
    """Whether the keyed-process ``target`` can move between workers with its state: a
    :class:`KeyedProcess` subclass that defines :meth:`~KeyedProcess.snapshot`. A function-form
    process never is."""
    return (isinstance(target, type) and issubclass(target, KeyedProcess)
            and getattr(target, "snapshot", None) is not KeyedProcess.snapshot)


def send_after(delay: float, msg: Any, keep_alive: bool = False) -> Timer:
    """In a keyed process: send itself ``msg`` once, ``delay`` seconds from now (a number from 0
    to :data:`~forseti_celery.core.conf.MAX_TIMEOUT`, else :class:`~forseti_celery.InvalidArgument`).

    It arrives as ``handle_info(msg)`` (``receive()`` returns it in the function form), in order
    with the other messages: one due while messages wait is handled after them. ``msg`` may be any
    object (it is not copied, and never leaves the process). With ``keep_alive`` its arrival counts
    as activity for passivation (``forseti_idle_timeout``), as a ``send`` does. Call it from the
    process's own thread (its handlers, its function); the timer dies with the process.
    """
    return _running("send_after").start_timer(_checked("delay", delay, zero=True), msg, None, bool(keep_alive))


def send_every(interval: float, msg: Any, keep_alive: bool = False) -> Timer:
    """In a keyed process: send itself ``msg`` every ``interval`` seconds (``> 0``, at most
    :data:`~forseti_celery.core.conf.MAX_TIMEOUT`) until :meth:`Timer.cancel` or the end of the
    process; the first one ``interval`` seconds from now. Ticks missed while the process was busy
    for longer than ``interval`` are skipped, not made up. Otherwise as :func:`send_after`."""
    seconds = _checked("interval", interval, zero=False)
    return _running("send_every").start_timer(seconds, msg, seconds, bool(keep_alive))


def _checked(what: str, seconds: Any, *, zero: bool) -> float:
    if seconds is None:
        raise InvalidArgument(f"{what} must be a number of seconds, not None")
    try:
        value = checked_timeout(seconds, None, zero=zero)
    except InvalidArgument:
        least = ">= 0" if zero else "> 0"
        raise InvalidArgument(f"{what} must be a number of seconds {least} and at most {MAX_TIMEOUT:g} "
                              f"(forseti_celery.core.conf.MAX_TIMEOUT), not {seconds!r}") from None
    assert value is not None
    return value


class Mailbox(Protocol):
    """What :func:`receive` and the timers ask of the running keyed process's mailbox."""

    def receive(self, timeout: float | None) -> Any: ...
    def start_timer(self, delay: float, msg: Any, interval: float | None, keep_alive: bool) -> Timer: ...


def _running(what: str) -> Mailbox:
    if _mailbox is None:
        raise RuntimeError(f"forseti_celery.{what}() is only available inside a keyed process")
    return _mailbox


class StateHook(Protocol):
    """What :meth:`KeyedProcess.checkpoint` asks of the running keyed process's state side."""

    def checkpoint(self, obj: KeyedProcess) -> bool: ...


#: The running keyed process's state side (``forseti_celery.child.state``), set as it starts.
_state: StateHook | None = None

#: The running keyed process's mailbox: set once, by its runtime (``forseti_celery.child.runtime``)
#: as the process starts; ``None`` anywhere else.
_mailbox: Mailbox | None = None
