"""The messages between a worker and its keyed processes, on their pipe, as types.

Owns the pipe's message type names and their wire form (framed as a broker message's
lines, see ``docs/design.rst``: Between a worker and its keyed processes). The worker
also forwards the ``cast``, ``call`` and ``stop`` messages it routes (:mod:`.messages`)
as they came, and a keyed process answers a call with a :class:`~.messages.Reply`
carrying ``reply_to``, which its worker forwards to the caller as it came.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import InvalidMessage
from .messages import CALL, CAST, FROZEN, REPLY, STOP, Wire, need

__all__ = [
    "ASSIGN", "CALL", "CAST", "EXIT", "HANDED_OFF", "HANDOFF", "HANDOFF_FAILED", "HANDOFF_REASON", "INIT_ERROR",
    "PIPE_KINDS", "REPLY", "STARTED", "STOP", "TOUCH", "Assign", "Exit", "HandedOff", "Handoff", "HandoffFailed",
    "InitError", "PipeMessage", "Started", "StopChild", "Touch", "from_pipe",
]

# worker -> keyed process (besides the cast, call and stop it routes)
ASSIGN = "assign"
HANDOFF = "handoff"
# keyed process -> worker (besides its replies, ``reply``)
STARTED = "started"
INIT_ERROR = "init_error"
EXIT = "exit"
TOUCH = "touch"
HANDED_OFF = "handed_off"
HANDOFF_FAILED = "handoff_failed"
#: The exit reason (and ``terminate`` reason) of a keyed process that handed its state off.
HANDOFF_REASON = "handoff"


@dataclass(**FROZEN)
class Assign:
    """To a spare: become the keyed process ``(name, key)``, ``init`` with ``args``, then
    ``restore(state)`` when ``state`` is not ``None`` (a handoff's snapshot). ``epoch`` and
    ``sid`` (the leader's epoch and the spawn's id) are the incarnation's token, which fences its
    checkpoints (:mod:`~forseti_celery.core.state`). Optional on the wire, written only when set:
    ``state`` (wire ``state``), ``epoch`` and ``sid``. A worker forking the process for its key
    hands it this same object (``forseti_celery.child.runtime.run``'s ``assign``)."""

    T: ClassVar[str] = ASSIGN
    name: str
    key: str
    args: list[Any]
    state: Any = None
    epoch: int = 0
    sid: str = ""

    def to_wire(self) -> Wire:
        d: Wire = {"t": ASSIGN, "n": self.name, "k": self.key, "a": self.args}
        if self.state is not None:
            d["state"] = self.state
        if self.sid:
            d["epoch"] = self.epoch
            d["sid"] = self.sid
        return d

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Assign:
        epoch = d.get("epoch", 0)
        return cls(need(d, "n"), need(d, "k"), d.get("a", []), d.get("state"),
                   epoch if type(epoch) is int else 0, str(d.get("sid", "")))


@dataclass(**FROZEN)
class Handoff:
    """To a movable keyed process: after the messages written before this one, take
    ``snapshot()`` and answer :class:`HandedOff` (or :class:`HandoffFailed`), then end
    (``terminate("handoff")``, exit reason ``handoff``; after a failure ``shutdown``)."""

    T: ClassVar[str] = HANDOFF

    def to_wire(self) -> Wire:
        return {"t": HANDOFF}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Handoff:
        return cls()


@dataclass(**FROZEN)
class HandedOff:
    """From a keyed process answering :class:`Handoff`: its ``snapshot()`` (JSON-able, any size:
    the pipe's frames have no limit). Its ``terminate("handoff")`` and exit follow."""

    T: ClassVar[str] = HANDED_OFF
    state: Any

    def to_wire(self) -> Wire:
        return {"t": HANDED_OFF, "state": self.state}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> HandedOff:
        return cls(d.get("state"))


@dataclass(**FROZEN)
class HandoffFailed:
    """From a keyed process answering :class:`Handoff`: no snapshot (``snapshot`` raised
    ``exc_type`` saying ``text``, its value is not JSON, or the process is not movable). It
    ends as a warm shutdown ends it: ``terminate("shutdown")``, exit reason ``shutdown``."""

    T: ClassVar[str] = HANDOFF_FAILED
    exc_type: str  #: wire ``type``
    text: str  #: wire ``msg``

    def to_wire(self) -> Wire:
        return {"t": HANDOFF_FAILED, "type": self.exc_type, "msg": self.text}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> HandoffFailed:
        return cls(need(d, "type"), need(d, "msg"))


@dataclass(**FROZEN)
class StopChild:
    """To a keyed process: stop (its ``terminate`` runs with ``reason``); the worker kills it if
    still alive ``grace`` seconds later. A routed :class:`~.messages.Stop` means the same."""

    T: ClassVar[str] = STOP
    reason: str
    grace: float | None = None

    def to_wire(self) -> Wire:
        return {"t": STOP, "reason": self.reason, "grace": self.grace}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> StopChild:
        return cls(d.get("reason", "stop"), d.get("grace"))


@dataclass(**FROZEN)
class Started:
    """From a keyed process: ``init`` returned."""

    T: ClassVar[str] = STARTED

    def to_wire(self) -> Wire:
        return {"t": STARTED}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Started:
        return cls()


@dataclass(**FROZEN)
class InitError:
    """From a keyed process: ``init`` raised ``exc_type`` (qualified name) saying ``text``."""

    T: ClassVar[str] = INIT_ERROR
    exc_type: str  #: wire ``type``
    text: str  #: wire ``msg``

    def to_wire(self) -> Wire:
        return {"t": INIT_ERROR, "type": self.exc_type, "msg": self.text}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> InitError:
        return cls(need(d, "type"), need(d, "msg"))


@dataclass(**FROZEN)
class Exit:
    """From a keyed process, as it ends: why (``normal``, ``stop``, ``crash: ...``, ...)."""

    T: ClassVar[str] = EXIT
    reason: str

    def to_wire(self) -> Wire:
        return {"t": EXIT, "reason": self.reason}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Exit:
        return cls(need(d, "reason"))


@dataclass(**FROZEN)
class Touch:
    """From a keyed process: a timer set with ``keep_alive`` fired, which counts as activity for
    passivation (``forseti_idle_timeout``) as a message written to it does. Sent at most once a
    second; a worker that does not know it ignores it."""

    T: ClassVar[str] = TOUCH

    def to_wire(self) -> Wire:
        return {"t": TOUCH}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Touch:
        return cls()


PipeMessage = Assign | StopChild | Started | InitError | Exit | Touch | Handoff | HandedOff | HandoffFailed

#: The pipe's own kinds, by type name (a ``stop`` read here is a :class:`StopChild`).
PIPE_KINDS: dict[str, Any] = {cls.T: cls for cls in (Assign, StopChild, Started, InitError, Exit, Touch, Handoff,
                                                     HandedOff, HandoffFailed)}


def from_pipe(d: Mapping[str, Any]) -> PipeMessage:
    """The typed pipe message of the decoded envelope ``d`` (not for ``cast``, ``call`` and
    ``reply``, which are :mod:`.messages`' kinds): :class:`InvalidMessage` if unknown."""
    kind = PIPE_KINDS.get(d.get("t"))  # type: ignore[arg-type]
    if kind is None:
        raise InvalidMessage(f"unknown pipe message type {d.get('t')!r}")
    return kind.from_wire(d)  # type: ignore[no-any-return]
