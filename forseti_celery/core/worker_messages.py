"""The messages workers and the leader send each other, as types (see :mod:`.messages`).

Owns the wire form of starts, start failures, exits, registries and their requests,
pings, heartbeats and goodbyes, moves, and :func:`from_wire`, the typed message of any
decoded envelope.

A handed-off process's state (its ``snapshot()``, issue 13) rides as the payload of its
:class:`Exited` and of the :class:`Spawn` of its next incarnation: JSON bytes after the envelope
(see :mod:`.codec`), which no worker thread decodes (:attr:`Exited.state`, :attr:`Spawn.state`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .codec import Raw, encode
from .errors import InvalidMessage
from .messages import (
    BYE,
    EXITED,
    FROZEN,
    HEARTBEAT,
    LEADS,
    MOVE,
    PAYLOAD,
    PING,
    REPORT,
    REPORT_REQUEST,
    SPAWN,
    SPAWN_FAILED,
    SPAWNED,
    Call,
    Cast,
    Followed,
    Get,
    Metrics,
    Moved,
    Reply,
    Search,
    Stop,
    StopKey,
    Wire,
    need,
)

__all__ = [
    "REASON_HANDOFF",
    "WIRE_KINDS",
    "Bye",
    "Exited",
    "Heartbeat",
    "Leads",
    "Message",
    "Move",
    "Ping",
    "Report",
    "ReportRequest",
    "Spawn",
    "SpawnFailed",
    "Spawned",
    "from_wire",
]


#: The exit reason of a process that handed its state off to its next incarnation.
REASON_HANDOFF = "handoff"


def with_state(d: Wire, state: bytes | None) -> Wire:
    """The envelope ``d`` with ``state`` (JSON bytes) as its payload (a :class:`~.codec.Raw`:
    written as it is), or ``d`` itself when there is none."""
    if state is None:
        return d
    head = encode([d])
    d[PAYLOAD] = Raw(head + b"\t" + state, len(head) + 1)
    return d


def state_of(d: Mapping[str, Any]) -> bytes | None:
    """The payload of a decoded envelope as JSON bytes (a handed-off state), None if it has none."""
    raw = d.get(PAYLOAD)
    return bytes(raw.line[raw.at:]) if isinstance(raw, Raw) else None


# -- worker -> leader ---------------------------------------------------------------------
@dataclass(**FROZEN)
class Spawned:
    """A process's ``init`` returned: ``pid`` runs ``(name, key)`` on ``node``, as ordered by ``sid``."""

    T: ClassVar[str] = SPAWNED
    name: str
    key: str
    node: str
    sid: str
    pid: int

    def to_wire(self) -> Wire:
        return {"t": SPAWNED, "n": self.name, "k": self.key, "node": self.node, "sid": self.sid, "pid": self.pid}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Spawned:
        return cls(need(d, "n"), need(d, "k"), need(d, "node"), d.get("sid", ""), need(d, "pid"))


@dataclass(**FROZEN)
class SpawnFailed:
    """The start ordered as ``sid`` did not happen: ``error`` is ``start``, ``resource``,
    ``unknown_name`` or ``unavailable`` (place it elsewhere); ``exc_type``/``text`` say why."""

    T: ClassVar[str] = SPAWN_FAILED
    name: str
    key: str
    node: str
    sid: str
    error: str
    exc_type: str | None = None  #: wire ``type``
    text: str | None = None  #: wire ``msg``

    def to_wire(self) -> Wire:
        d = {"t": SPAWN_FAILED, "n": self.name, "k": self.key, "node": self.node, "sid": self.sid,
             "error": self.error}
        if self.exc_type is not None:
            d["type"] = self.exc_type
        if self.text is not None:
            d["msg"] = self.text
        return d

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> SpawnFailed:
        return cls(need(d, "n"), need(d, "k"), need(d, "node"), d.get("sid", ""), need(d, "error"),
                   d.get("type"), d.get("msg"))


@dataclass(**FROZEN)
class Exited:
    """A started process ended (``reason`` as in the exit event); the leader answers ``stoppers``
    (``[reply queue, correlation id]`` each) once the key is free. Without a ``reason``: a stop
    found its process gone already (``pid`` None), sent so its caller is answered in order."""

    T: ClassVar[str] = EXITED
    name: str
    key: str
    node: str
    pid: int | None
    stoppers: list[list[str]]
    sid: str | None = None
    reason: str | None = None
    code: int | None = None  #: the process's exit code (negative: the signal that killed it)
    #: A handoff (reason ``handoff``): the process's ``snapshot()`` as JSON bytes (the payload),
    #: the worker it is to go to (wire ``to``; None: the least-used other one), when the handoff
    #: began (wire ``ho``, ``time.time()``) and the key's init args (wire ``a``: for a leader that
    #: rebuilt its table without the process). Written only when set.
    state: bytes | None = None
    to: str | None = None
    since: float | None = None
    args: list[Any] | None = None

    def to_wire(self) -> Wire:
        if self.reason is None:
            return {"t": EXITED, "n": self.name, "k": self.key, "node": self.node, "pid": self.pid,
                    "stoppers": self.stoppers}
        d: Wire = {"t": EXITED, "n": self.name, "k": self.key, "node": self.node, "sid": self.sid, "pid": self.pid,
                   "reason": self.reason, "code": self.code, "stoppers": self.stoppers}
        if self.to is not None:
            d["to"] = self.to
        if self.since is not None:
            d["ho"] = self.since
        if self.args is not None:
            d["a"] = self.args
        return with_state(d, self.state)

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Exited:
        return cls(need(d, "n"), need(d, "k"), need(d, "node"), d.get("pid"), d.get("stoppers", []),
                   d.get("sid"), d.get("reason"), d.get("code"), state_of(d), d.get("to"), d.get("ho"), d.get("a"))


@dataclass(**FROZEN)
class Ping:
    """RabbitMQ: a worker asks whoever consumes the leader queue to answer ``nonce`` (:class:`Leads`)."""

    T: ClassVar[str] = PING
    node: str
    nonce: str

    def to_wire(self) -> Wire:
        return {"t": PING, "node": self.node, "nonce": self.nonce}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Ping:
        return cls(need(d, "node"), d.get("nonce", ""))


@dataclass(**FROZEN)
class Report:
    """A worker's registry, asked for by ``leader`` (:class:`ReportRequest`): ``procs`` is a list
    of ``[name, key, pid, sid]`` (pid None while starting); ``q`` echoes the request's; ``args``
    (wire ``a``, optional: older workers send none) each entry's init args, parallel to ``procs``;
    ``restarts`` (wire ``restarts``, optional, written when one is not 0) each entry's restart
    count (:attr:`Spawn.restarts`), parallel to ``procs``."""

    T: ClassVar[str] = REPORT
    node: str
    epoch: int
    procs: list[list[Any]]
    q: int = 0
    args: list[list[Any] | None] | None = None
    restarts: list[int] | None = None

    def to_wire(self) -> Wire:
        d = {"t": REPORT, "node": self.node, "epoch": self.epoch, "procs": self.procs, "q": self.q}
        if self.args is not None:
            d["a"] = self.args
        if self.restarts is not None and any(self.restarts):
            d["restarts"] = self.restarts
        return d

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Report:
        return cls(need(d, "node"), int(need(d, "epoch")), need(d, "procs"), int(d.get("q", 0)), d.get("a"),
                   d.get("restarts"))


# -- leader -> worker ---------------------------------------------------------------------
@dataclass(**FROZEN)
class Spawn:
    """Start ``(name, key)`` with ``args``, ordered as ``sid`` by ``leader`` in ``epoch``; the
    worker answers the callers ``waiters`` (``[reply queue, correlation id]`` each) itself.
    Optional, written only when set (a restart, issue 12): ``after``, seconds the worker holds the
    order before it starts the key (the restart's back-off: held by the worker, not the leader, it
    survives a failover in the worker's registry); ``restarts``, the key's restart count, kept by
    the worker with the process and reported back (:attr:`Report.restarts`)."""

    T: ClassVar[str] = SPAWN
    name: str
    key: str
    args: list[Any]
    sid: str
    epoch: int
    leader: str
    waiters: list[list[str]]
    after: float | None = None
    restarts: int | None = None
    #: A handoff's next incarnation (issue 13): the state it restores (JSON bytes, the payload),
    #: the worker it comes from (wire ``src``) and when its handoff began (wire ``ho``).
    state: bytes | None = None
    source: str | None = None
    since: float | None = None

    def to_wire(self) -> Wire:
        d = {"t": SPAWN, "n": self.name, "k": self.key, "a": self.args, "sid": self.sid, "epoch": self.epoch,
             "leader": self.leader, "w": self.waiters}
        if self.after is not None:
            d["after"] = self.after
        if self.restarts is not None:
            d["restarts"] = self.restarts
        if self.source is not None:
            d["src"] = self.source
        if self.since is not None:
            d["ho"] = self.since
        return with_state(d, self.state)

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Spawn:
        return cls(need(d, "n"), need(d, "k"), d.get("a", []), need(d, "sid"), int(d.get("epoch", 0)),
                   d.get("leader", ""), d.get("w", []), d.get("after"), d.get("restarts"), state_of(d),
                   d.get("src"), d.get("ho"))

    @property
    def hold(self) -> float:
        """Seconds to hold the order: :attr:`after` if it is a number of seconds from 0 to 60 (a
        back-off is 10 s at most: a broken order holds nothing for long), else 0."""
        a: Any = self.after
        return float(a) if type(a) in (int, float) and 0 < a <= 60.0 else 0.0

    @property
    def restart_count(self) -> int:
        """:attr:`restarts` if it is a count, else 0."""
        r = self.restarts
        return r if type(r) is int and r > 0 else 0


@dataclass(**FROZEN)
class Move:
    """Hand process ``pid`` of ``(name, key)`` off to worker ``to`` (its state with it), ordered by
    ``leader`` in ``epoch``: a rebalance's move (see ``docs/state.rst``: Rebalancing)."""

    T: ClassVar[str] = MOVE
    name: str
    key: str
    pid: int
    to: str
    leader: str
    epoch: int

    def to_wire(self) -> Wire:
        return {"t": MOVE, "n": self.name, "k": self.key, "p": self.pid, "to": self.to, "leader": self.leader,
                "epoch": self.epoch}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Move:
        return cls(need(d, "n"), need(d, "k"), need(d, "p"), need(d, "to"), d.get("leader", ""),
                   int(d.get("epoch", 0)))


@dataclass(**FROZEN)
class ReportRequest:
    """A leader asks a worker for its registry (:class:`Report`); ``q``: its count of records."""

    T: ClassVar[str] = REPORT_REQUEST
    leader: str
    epoch: int
    q: int = 0

    def to_wire(self) -> Wire:
        return {"t": REPORT_REQUEST, "leader": self.leader, "epoch": self.epoch, "q": self.q}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> ReportRequest:
        return cls(need(d, "leader"), int(need(d, "epoch")), int(d.get("q", 0)))


@dataclass(**FROZEN)
class Leads:
    """The answer to a :class:`Ping`: ``leader`` leads in ``epoch``."""

    T: ClassVar[str] = LEADS
    leader: str
    epoch: int
    nonce: str | None

    def to_wire(self) -> Wire:
        return {"t": LEADS, "leader": self.leader, "epoch": self.epoch, "nonce": self.nonce}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Leads:
        return cls(need(d, "leader"), int(need(d, "epoch")), d.get("nonce"))


# -- worker -> every worker ---------------------------------------------------------------
@dataclass(**FROZEN)
class Heartbeat:
    """A worker's beat, every forseti_heartbeat seconds (``docs/design.rst``: Worker to worker).
    ``keep`` (optional, the leader's only): ``[name, key, args, restarts]`` of each process of
    its own worker that a restart policy would restart, for a successor to restart if it dies."""

    T: ClassVar[str] = HEARTBEAT
    node: str
    inc: str  #: the worker's incarnation
    seq: int
    eligible: bool
    names: list[str]
    count: int
    leader: bool  #: whether it is the leader serving requests
    epoch: int
    pid: int
    host: str
    keep: list[list[Any]] | None = None

    def to_wire(self) -> Wire:
        d = {"t": HEARTBEAT, "node": self.node, "inc": self.inc, "seq": self.seq, "eligible": self.eligible,
             "names": self.names, "count": self.count, "leader": self.leader, "epoch": self.epoch,
             "pid": self.pid, "host": self.host}
        if self.keep is not None:
            d["keep"] = self.keep
        return d

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Heartbeat:
        return cls(need(d, "node"), d.get("inc", ""), d.get("seq", 0), bool(d.get("eligible", False)),
                   d.get("names", []), d.get("count", 0), bool(d.get("leader", False)), d.get("epoch", 0),
                   d.get("pid", 0), d.get("host", ""), d.get("keep"))


@dataclass(**FROZEN)
class Bye:
    """Incarnation ``inc`` of worker ``node`` is leaving (warm shutdown, its processes gone)."""

    T: ClassVar[str] = BYE
    node: str
    inc: str

    def to_wire(self) -> Wire:
        return {"t": BYE, "node": self.node, "inc": self.inc}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Bye:
        return cls(need(d, "node"), need(d, "inc"))


Message = (Get | Search | Metrics | StopKey | Spawned | SpawnFailed | Exited | Ping | Report | Spawn
           | ReportRequest | Leads | Cast | Call | Stop | Reply | Heartbeat | Bye | Moved | Followed | Move)

#: Every kind of the broker's messages, by type name.
WIRE_KINDS: dict[str, Any] = {cls.T: cls for cls in (
    Get, Search, Metrics, StopKey, Spawned, SpawnFailed, Exited, Ping, Report, Spawn, ReportRequest, Leads,
    Cast, Call, Stop, Reply, Heartbeat, Bye, Moved, Followed, Move)}


def from_wire(d: Mapping[str, Any]) -> Message:
    """The typed message of the decoded envelope ``d``: raises :class:`InvalidMessage` for an
    unknown type or a missing field."""
    kind = WIRE_KINDS.get(d.get("t"))  # type: ignore[arg-type]
    if kind is None:
        raise InvalidMessage(f"unknown message type {d.get('t')!r}")
    return kind.from_wire(d)  # type: ignore[no-any-return]
