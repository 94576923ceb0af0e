"""The protocol's messages as types: one frozen dataclass per kind, with its wire form.

Owns every message type name (``"get"``, ``"cast"``, ...) and how each kind is written to
and read from the wire: ``to_wire()`` gives the envelope as the dict the codec
(:mod:`.codec`) encodes, with the one-letter field names of ``docs/design.rst``
(Messages), and ``from_wire(d)`` reads one back. The field names of the wire appear
here and in the codec's shape checks only; code elsewhere uses the attributes.

``to_wire`` writes each kind's fields in the order its senders always have, so the
bytes on the wire are those of older workers and clients (a rolling upgrade mixes
them). ``from_wire`` ignores fields it does not know: a newer sender may add
optional ones. A payload (a cast's or call's message, a keyed process's answer)
is never in the envelope: the codec writes it after it (``encode_message(...,
payload=)``), and a decoded message keeps it, undecoded, in ``payload``.

Here: the type names and the messages of clients (requests, casts, calls, stops) and
their answers (:class:`Reply`); the messages workers and the leader send each other
are in :mod:`.worker_messages`, those between a worker and its keyed processes in
:mod:`.pipe`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import InvalidMessage

__all__ = [
    "ARGS", "BYE", "CALL", "CAST", "CORR", "EXITED", "FOLLOWED", "GET", "HEARTBEAT", "KEY", "KEY_ADDRESSED", "LEADS",
    "METRICS",
    "MOVE", "MOVED", "NAME", "NO_VALUE", "PAYLOAD", "PID", "PING", "REPLY", "REPLY_TO", "REPORT", "REPORT_REQUEST",
    "SEARCH", "SEQ", "SPAWN", "SPAWNED", "SPAWN_FAILED", "STOP", "STOP_KEY", "TYPE",
    "Call", "Cast", "Followed", "Get", "Metrics", "Moved", "Reply", "Search", "Stop", "StopKey", "Wire",
]

#: A message as the codec reads and writes it: its envelope's fields by wire name.
Wire = dict[str, Any]

# -- message types (the ``t`` field) ---------------------------------------------------------
# client -> leader
GET = "get"
SEARCH = "search"
METRICS = "metrics"
STOP_KEY = "stop_key"
# worker -> leader
SPAWNED = "spawned"
SPAWN_FAILED = "spawn_failed"
EXITED = "exited"
PING = "ping"  # RabbitMQ: every worker, every heartbeat, so the leader queue's consumer learns it leads
# leader -> worker (its node queue)
SPAWN = "spawn"
MOVE = "move"  # hand one key off to another worker (rebalancing, ``celery forseti rebalance``)
REPORT_REQUEST = "report?"
LEADS = "leads"  # the leader answers a ping: on RabbitMQ, how workers learn epochs
# worker -> the leader's node queue
REPORT = "report"
# client -> worker (its node queue)
CAST = "cast"
CALL = "call"
STOP = "stop"
#: the answer to a ``moved`` notice: the client's route to the key no longer leads to the old process
FOLLOWED = "followed"
# anyone -> client (its reply queue)
REPLY = "reply"
# worker -> client (its reply queue): key-addressed messages of that client now go to a new incarnation
MOVED = "moved"
# worker -> every worker (broadcast)
HEARTBEAT = "hb"
BYE = "bye"

#: The field of every envelope that names its type (a Celery event, which a client's reply
#: queue hears on Redis, has none).
TYPE = "t"
#: The field carried as the payload, after its envelope (see :mod:`.codec`).
PAYLOAD = "m"
#: Fields of a cast or call that the worker's hot paths read by name (no dataclass per message
#: there): the keyed-process name, key and pid it is for, the caller's reply routing key and
#: correlation id; and the optional fields of a key-addressed one (``forseti_celery.call/send``):
#: the flag itself, the init args of its key (for its next incarnation) and the sender's sequence
#: number (per client, increasing).
NAME = "n"
KEY = "k"
PID = "p"
REPLY_TO = "r"
CORR = "c"
KEY_ADDRESSED = "ka"
ARGS = "a"
SEQ = "q"
#: ``payload`` of a message that has none; ``value`` of a :class:`Reply` that carries none.
NO_VALUE: Any = type("NoValue", (), {"__repr__": lambda self: "NO_VALUE", "__slots__": ()})()

#: Every message class is a frozen dataclass with slots: cheap to build, and a value.
FROZEN: dict[str, Any] = {"frozen": True, "slots": True}


def need(d: Mapping[str, Any], field: str) -> Any:
    """``d[field]``, or :class:`InvalidMessage` naming what is missing."""
    try:
        return d[field]
    except KeyError:
        raise InvalidMessage(f"{d.get('t')!r} message without {field!r}") from None


def deadline_of(d: Mapping[str, Any]) -> float | None:
    """A request's deadline ``d`` (``time.time()``), None if it says none."""
    value = d.get("d")
    return value if type(value) is float else float(value) if type(value) is int else None


# -- client -> leader (all carry reply_to ``r``, corr ``c``, deadline ``d``) --------------------
@dataclass(**FROZEN)
class Get:
    """The live process of ``(name, key)``, started with ``args`` (after the key) if absent."""

    T: ClassVar[str] = GET
    name: str
    key: str
    args: list[Any]
    reply_to: str
    corr: str
    deadline: float | None = None  #: ``time.time()`` when the caller gives up

    def to_wire(self) -> Wire:
        return {"t": GET, "n": self.name, "k": self.key, "a": self.args, "r": self.reply_to, "c": self.corr,
                "d": self.deadline}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Get:
        return cls(need(d, "n"), need(d, "k"), d.get("a", []), need(d, "r"), need(d, "c"), deadline_of(d))


@dataclass(**FROZEN)
class Search:
    """The live process of ``(name, key)`` or none; never creates one."""

    T: ClassVar[str] = SEARCH
    name: str
    key: str
    reply_to: str
    corr: str
    deadline: float | None = None

    def to_wire(self) -> Wire:
        return {"t": SEARCH, "n": self.name, "k": self.key, "r": self.reply_to, "c": self.corr, "d": self.deadline}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Search:
        return cls(need(d, "n"), need(d, "k"), need(d, "r"), need(d, "c"), deadline_of(d))


@dataclass(**FROZEN)
class Metrics:
    """How many live keyed processes each eligible worker runs."""

    T: ClassVar[str] = METRICS
    reply_to: str
    corr: str
    deadline: float | None = None

    def to_wire(self) -> Wire:
        return {"t": METRICS, "r": self.reply_to, "c": self.corr, "d": self.deadline}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Metrics:
        return cls(need(d, "r"), need(d, "c"), deadline_of(d))


@dataclass(**FROZEN)
class StopKey:
    """Stop the process ``pid`` of ``(name, key)`` on ``node``; answered once its key is free."""

    T: ClassVar[str] = STOP_KEY
    name: str
    key: str
    pid: int
    node: str
    reason: str
    grace: float | None  #: seconds ``terminate`` has before a kill (None: forseti_stop_timeout)
    reply_to: str
    corr: str
    deadline: float | None = None

    def to_wire(self) -> Wire:
        return {"n": self.name, "k": self.key, "p": self.pid, "t": STOP_KEY, "node": self.node,
                "reason": self.reason, "grace": self.grace, "r": self.reply_to, "c": self.corr, "d": self.deadline}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> StopKey:
        return cls(need(d, "n"), need(d, "k"), need(d, "p"), need(d, "node"), d.get("reason", "stop"),
                   d.get("grace"), need(d, "r"), need(d, "c"), deadline_of(d))

    def forwarded(self) -> Stop:
        """The ``stop`` the leader sends the process's worker: its exit report answers this caller."""
        return Stop(self.name, self.key, self.pid, self.reason, self.grace, self.node, self.reply_to, self.corr,
                    self.deadline)


# -- client -> worker ---------------------------------------------------------------------
@dataclass(**FROZEN)
class Cast:
    """``ref.send(m)``: the message ``payload`` for process ``pid`` of ``(name, key)``."""

    T: ClassVar[str] = CAST
    name: str
    key: str
    pid: int
    payload: Any = NO_VALUE  #: not in the envelope (decoded: the codec's undecoded ``Raw``)
    #: Key-addressed (``forseti_celery.send``): never lost to an exit its sender did not cause,
    #: delivered to the key's next incarnation (started with ``args``) if ``pid`` is gone. Wire ``ka``.
    key_addressed: bool = False
    args: list[Any] | None = None  #: wire ``a`` (key-addressed only)
    seq: int | None = None  #: wire ``q``: the sender's sequence number (key-addressed only)
    reply_to: str | None = None  #: wire ``r``: where the sender hears ``moved`` (key-addressed only)

    def to_wire(self) -> Wire:
        if self.key_addressed:
            return Cast.envelope(self.name, self.key, self.pid, self.args, self.seq, self.reply_to)
        return Cast.envelope(self.name, self.key, self.pid)

    @staticmethod
    def envelope(name: str, key: str, pid: int, args: list[Any] | None = None, seq: int | None = None,
                 reply_to: str | None = None) -> Wire:
        """The wire form of ``Cast(name, key, pid)`` without building it: a client's sends are
        its hot path, where a frozen dataclass's construction would be a tenth of the cost.
        With ``seq``, a key-addressed cast (its optional fields after the old ones: an older
        worker reads it as a plain cast)."""
        if seq is None:
            return {"n": name, "k": key, "p": pid, "t": CAST}
        return {"n": name, "k": key, "p": pid, "t": CAST, "ka": 1, "a": [] if args is None else args, "q": seq,
                "r": reply_to}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Cast:
        if not d.get(KEY_ADDRESSED):
            return cls(need(d, "n"), need(d, "k"), need(d, "p"), d.get(PAYLOAD, NO_VALUE))
        return cls(need(d, "n"), need(d, "k"), need(d, "p"), d.get(PAYLOAD, NO_VALUE), True, d.get("a", []),
                   need(d, "q"), d.get("r"))


@dataclass(**FROZEN)
class Call:
    """``ref.call(m)``: answered (:class:`Reply`) by the process, or ``gone`` by its worker."""

    T: ClassVar[str] = CALL
    name: str
    key: str
    pid: int
    reply_to: str
    corr: str
    deadline: float | None = None
    payload: Any = NO_VALUE
    #: Key-addressed (``forseti_celery.call``): see :class:`Cast`; the answer still comes from
    #: the process that takes it, to ``reply_to``.
    key_addressed: bool = False
    args: list[Any] | None = None  #: wire ``a`` (key-addressed only)
    seq: int | None = None  #: wire ``q`` (key-addressed only)

    def to_wire(self) -> Wire:
        d: Wire = {"n": self.name, "k": self.key, "p": self.pid, "t": CALL, "r": self.reply_to, "c": self.corr,
                   "d": self.deadline}
        if self.key_addressed:
            d.update(ka=1, a=[] if self.args is None else self.args, q=self.seq)
        return d

    @staticmethod
    def caller(d: Mapping[str, Any]) -> tuple[Any, Any]:
        """``(reply_to, corr)`` of the decoded call ``d``, read without building the call: a keyed
        process answers every call with them (its hot path)."""
        return d["r"], d["c"]

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Call:
        if not d.get(KEY_ADDRESSED):
            return cls(need(d, "n"), need(d, "k"), need(d, "p"), need(d, "r"), need(d, "c"), deadline_of(d),
                       d.get(PAYLOAD, NO_VALUE))
        return cls(need(d, "n"), need(d, "k"), need(d, "p"), need(d, "r"), need(d, "c"), deadline_of(d),
                   d.get(PAYLOAD, NO_VALUE), True, d.get("a", []), need(d, "q"))


@dataclass(**FROZEN)
class Stop:
    """Stop process ``pid`` of ``(name, key)``: ``terminate`` runs, a kill ``grace`` seconds later.
    Forwarded from a :class:`StopKey` (:meth:`StopKey.forwarded`), it carries its caller
    (``reply_to``, ``corr``), answered by the leader after the exit report."""

    T: ClassVar[str] = STOP
    name: str
    key: str
    pid: int | None
    reason: str
    grace: float | None = None
    node: str | None = None
    reply_to: str | None = None
    corr: str | None = None
    deadline: float | None = None

    def to_wire(self) -> Wire:
        if self.reply_to is not None:  # as the leader always forwarded a stop_key: its fields, retyped
            return {"n": self.name, "k": self.key, "p": self.pid, "t": STOP, "node": self.node,
                    "reason": self.reason, "grace": self.grace, "r": self.reply_to, "c": self.corr,
                    "d": self.deadline}
        d: Wire = {"t": STOP, "n": self.name, "k": self.key, "p": self.pid, "reason": self.reason}
        if self.grace is not None:
            d["grace"] = self.grace
        return d

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Stop:
        return cls(need(d, "n"), need(d, "k"), d.get("p"), d.get("reason", "stop"), d.get("grace"),
                   d.get("node"), d.get("r"), d.get("c"), deadline_of(d))


# -- anyone -> client ---------------------------------------------------------------------
@dataclass(**FROZEN)
class Reply:
    """The answer to request ``corr``: a ``value`` (leader, worker), a ``payload`` (a keyed
    process's answer to a call), or an ``error`` kind (``docs/design.rst``: Answers) with the
    remote exception's ``exc_type`` and ``text``. ``reply_to`` only on a keyed process's pipe:
    where its worker forwards it (the caller ignores it)."""

    T: ClassVar[str] = REPLY
    corr: str
    value: Any = NO_VALUE  #: wire ``v``
    error: str | None = None
    text: str | None = None  #: wire ``msg``
    exc_type: str | None = None  #: wire ``type``
    reply_to: str | None = None  #: wire ``r``
    payload: Any = NO_VALUE  #: wire ``m``, after the envelope

    @classmethod
    def ok(cls, corr: str, value: Any) -> Reply:
        """The value ``value`` (JSON, in the envelope) for request ``corr``."""
        return cls(corr, value)

    @classmethod
    def fail(cls, corr: str, error: str, text: str, exc_type: str | None = None) -> Reply:
        """The error kind ``error`` (raised by the client as its exception) for request ``corr``."""
        return cls(corr, error=error, text=text, exc_type=exc_type)

    def to_wire(self) -> Wire:
        d: Wire = {"t": REPLY} if self.reply_to is None else {"t": REPLY, "r": self.reply_to}
        d["c"] = self.corr
        if self.error is not None:
            d["error"] = self.error
            if self.exc_type is not None:
                d["type"] = self.exc_type
            d["msg"] = self.text or ""
        elif self.value is not NO_VALUE:
            d["v"] = self.value
        return d

    @staticmethod
    def corr_of(d: Mapping[str, Any]) -> Any:
        """The correlation id of the decoded reply ``d``, read without building the reply: the
        client's consumer thread routes every answer by it to its waiting caller."""
        return d.get("c")

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Reply:
        return cls(need(d, "c"), d.get("v", NO_VALUE), d.get("error"), d.get("msg"), d.get("type"), d.get("r"),
                   d.get(PAYLOAD, NO_VALUE))


# -- worker -> client ---------------------------------------------------------------------
@dataclass(**FROZEN)
class Moved:
    """The key-addressed messages of one sender for ``(name, key)`` that reached process ``pid``
    on ``node`` after it had gone are with its next incarnation, ``new_pid`` on ``new_node``, up
    to (and including) the sender's sequence number ``seq``. Sent by the old worker to the
    sender's reply queue after it forwarded them: once ``seq`` covers all it sent on the old
    route, the sender may send to the new ref directly without overtaking anything."""

    T: ClassVar[str] = MOVED
    name: str
    key: str
    node: str
    pid: int
    new_node: str
    new_pid: int
    seq: int

    def to_wire(self) -> Wire:
        return {"t": MOVED, "n": self.name, "k": self.key, "node": self.node, "p": self.pid,
                "to": [self.new_node, self.new_pid], "q": self.seq}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Moved:
        to = need(d, "to")
        if not isinstance(to, list) or len(to) != 2:
            raise InvalidMessage(f"'moved' message with a bad 'to': {to!r}")
        return cls(need(d, "n"), need(d, "k"), need(d, "node"), need(d, "p"), to[0], to[1], need(d, "q"))


# -- client -> worker, in answer to a notice ---------------------------------------------------
@dataclass(**FROZEN)
class Followed:
    """The sender whose reply routing key is ``reply_to`` sends nothing more to process ``pid``
    for ``(name, key)``: its route moved (a ``moved`` notice covered it) or was dropped. Sent by
    the client to the old process's worker in answer to each :class:`Moved` notice once that is
    so: a leaving worker waits for it from every sender it told of a move
    (:mod:`forseti_celery.worker.leaving`)."""

    T: ClassVar[str] = FOLLOWED
    name: str
    key: str
    pid: int
    reply_to: str

    def to_wire(self) -> Wire:
        return {"t": FOLLOWED, "n": self.name, "k": self.key, "p": self.pid, "r": self.reply_to}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Followed:
        return cls(need(d, "n"), need(d, "k"), need(d, "p"), need(d, "r"))
