"""The state side of a keyed process (issue 13): restore at start, handoff, checkpoints.

Called by the sync loop (:mod:`.runtime`) and usable as is by another loop (an async one): each
step is a method of :class:`KeyState` that takes the user's object and does no waiting of its own
besides Redis. A movable process (its class defines ``snapshot``: :func:`~..core.process.is_movable`)
with ``forseti_state_url`` set claims its key in the checkpoint store as it starts, which fences
every older incarnation's writes (:mod:`~forseti_celery.core.state`).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from celery.utils.log import get_logger

from ..core import process
from ..core.conf import ChildConfig
from ..core.errors import ConfigurationError, ForsetiError, InvalidMessage
from ..core.pipe import HANDOFF_REASON, Assign, HandedOff, HandoffFailed
from ..core.process import KeyedProcess, Timer
from ..core.state import Checkpoints, StateUnavailable, Token

logger = get_logger(__name__)

__all__ = ["CHECKPOINT_DUE", "KeyState", "StaleIncarnation", "qualname"]

#: The message of the timer that takes an automatic checkpoint (``forseti_checkpoint_every``):
#: it never reaches the user's ``handle_info`` (see :meth:`KeyState.is_tick`).
CHECKPOINT_DUE = object()


class StaleIncarnation(ForsetiError):
    """A keyed process could not claim its key in the checkpoint store: a spawn of a newer
    leader epoch owns it (this start is stale and fails)."""


class KeyState:
    """One keyed process's state side; sets ``core.process._state`` so ``self.checkpoint()`` finds it.

    ``box`` is the process's mailbox (``send(msg)``, ``start_timer(...)``), ``target`` the
    keyed-process class or function, ``assign`` its start order (state, epoch, sid)."""

    def __init__(self, box: Any, config: ChildConfig, target: Any, assign: Assign) -> None:
        self.box = box
        self.name, self.key = assign.name, assign.key
        self.handed = assign.state
        self.movable = process.is_movable(target)
        # The spawn's id is unique per incarnation; a worker that gave none: one of our own.
        self.token: Token = (assign.epoch, assign.sid or f"x{uuid.uuid4().hex}")
        self.store = Checkpoints(config.state_url, config.namespace) if config.state_url and self.movable else None
        self.every = config.checkpoint_every if self.store is not None else None
        self.last = time.monotonic()  # when the last checkpoint was taken (or the process started)
        self.dirty = False  # a message was handled since the last checkpoint
        self.wrote = False  # a checkpoint was taken while the current message was handled
        self.timer: Timer | None = None
        self.stale = False
        process._state = self

    # -- start ------------------------------------------------------------------------------
    def to_restore(self) -> Any:
        """The state to ``restore`` after ``init`` (``None``: none): the handoff's, else the
        stored checkpoint's. Claims the key first (when checkpoints are on): raises
        :class:`StaleIncarnation` if refused, :class:`StateUnavailable` if Redis fails."""
        if self.store is None:
            return self.handed
        ok, stored = self.store.claim(self.name, self.key, self.token)
        if not ok:
            raise StaleIncarnation(f"a newer incarnation (leader epoch > {self.token[0]}) owns {self.key!r}")
        return self.handed if self.handed is not None else stored

    def start(self, obj: KeyedProcess) -> None:
        """After ``init`` returned: ``restore`` if there is a state (raises what it raises)."""
        state = self.to_restore()
        if state is not None:
            obj.restore(state)

    # -- checkpoints --------------------------------------------------------------------------
    def checkpoint(self, obj: KeyedProcess) -> bool:
        """``self.checkpoint()`` (:meth:`KeyedProcess.checkpoint`)."""
        if self.store is None:
            why = "forseti_state_url is not set" if self.movable else f"{type(obj).__name__} defines no snapshot()"
            raise ConfigurationError(f"checkpoint() needs a movable keyed process and forseti_state_url ({why})")
        return self._write(obj.snapshot())

    def _write(self, state: Any) -> bool:
        assert self.store is not None
        self.last, self.dirty, self.wrote = time.monotonic(), False, True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ok = self.store.write(self.name, self.key, self.token, state)
        if not ok and not self.stale:
            self.stale = True
            logger.warning("forseti: keyed process %r (pid %d): checkpoint refused, a newer process of its key "
                           "exists", self.key, os.getpid())
        return ok

    def handled(self, obj: KeyedProcess) -> None:
        """After a message was handled: an automatic checkpoint if one is due, else its timer set."""
        if self.every is None:
            return
        if self.wrote:  # the handler checkpointed itself: nothing changed since
            self.wrote = False
            return
        self.dirty = True
        if time.monotonic() - self.last >= self.every:
            self.auto(obj)
            self.wrote = False
        elif self.timer is None:
            self.timer = self.box.start_timer(max(0.0, self.last + self.every - time.monotonic()),
                                              CHECKPOINT_DUE, None, False)

    @staticmethod
    def is_tick(payload: Any) -> bool:
        """Whether a timer message's payload is the automatic checkpoint's (not the user's)."""
        return payload is CHECKPOINT_DUE

    def auto(self, obj: KeyedProcess) -> None:
        """The automatic checkpoint (its timer fired, or one is due): failures are logged only."""
        self.timer = None
        if not self.dirty:
            return
        try:
            self._write(obj.snapshot())
        except Exception:
            self.last, self.dirty = time.monotonic(), False  # not again at once: at the next period
            logger.exception("forseti: keyed process %r (pid %d): automatic checkpoint failed", self.key, os.getpid())

    # -- ends ---------------------------------------------------------------------------------
    def hand_off(self, obj: KeyedProcess) -> str:
        """The worker's :class:`~..core.pipe.Handoff`: ``snapshot()`` answered
        :class:`HandedOff` (also stored as the checkpoint, when on), then ``terminate("handoff")``;
        if there is none (not movable, ``snapshot`` raised, not JSON), :class:`HandoffFailed` and
        ``terminate("shutdown")``. Returns the exit reason."""
        try:
            if not self.movable:
                raise TypeError(f"{type(obj).__name__} defines no snapshot(): not movable")
            state = obj.snapshot()
            self.box.send(HandedOff(state).to_wire())
        except Exception as exc:
            logger.exception("forseti: keyed process %r (pid %d) could not hand off its state; it ends",
                             self.key, os.getpid())
            self.box.send(HandoffFailed(qualname(exc), str(exc)).to_wire())
            obj.terminate("shutdown")
            return "shutdown"
        if self.store is not None:
            self._try(self._write, state)
        obj.terminate(HANDOFF_REASON)
        return HANDOFF_REASON

    def stopping(self, obj: KeyedProcess, reason: str) -> None:
        """Before ``terminate(reason)``: any reason but ``stop`` keeps the key's checkpoint, taken
        now (passivation, a warm shutdown: the key comes back with this state)."""
        if self.store is not None and reason != "stop":
            self._try(lambda: self._write(obj.snapshot()))

    def stopped(self, reason: str) -> None:
        """After ``terminate(reason)`` returned: ``stop`` (the key ended on purpose) deletes the checkpoint."""
        if self.store is not None and reason == "stop":
            self._try(self.store.delete, self.name, self.key, self.token)

    def _try(self, step: Any, *args: Any) -> None:
        try:
            step(*args)
        except (StateUnavailable, InvalidMessage, TypeError, ValueError, NotImplementedError):
            logger.exception("forseti: keyed process %r (pid %d): checkpoint store", self.key, os.getpid())


def qualname(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
