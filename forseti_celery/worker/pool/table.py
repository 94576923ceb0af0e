"""Who is where: the one object the pool's threads share, and the record of one keyed process.

Four threads use the pool: the node's consumer thread (spawns, deliveries, stops), the spawner
thread (forks, see :mod:`~forseti_celery.worker.pool.spawner`), the watcher thread (pipes and
exits, see :mod:`~forseti_celery.worker.pool.watcher`) and the node's heartbeat thread (the
lifeline, a fencing kill). Everything more than one of them reads or writes is a field of
:class:`Table` or of a :class:`Child`, and is read and written under :attr:`Table.lock` only,
held for a few dictionary operations and never across a fork, a poll or a publish. A child's
mailbox has a lock of its own (:class:`~forseti_celery.worker.pool.outbox.Outbox`), taken
after :attr:`Table.lock` where both are held. Every other field has one owner, named below.
A :class:`Child` not in the table yet (being forked, or a zygote's fork being given its key)
belongs to the spawner thread alone. The watcher looks at :attr:`Table.new` without the lock,
as a hint: a child it misses is taken on its next round (a list is never torn).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ...core.messages import CALL, CAST, CORR, KEY_ADDRESSED, TYPE
from .outbox import Outbox

__all__ = ["Child", "Handing", "Key", "Start", "Table", "Waiter", "untaken_key_addressed"]

Key = tuple[str, str]
Waiter = tuple[str, str]


@dataclass(frozen=True)
class Start:
    """What a key's start carries besides its args: the leader's epoch (with the sid, its
    process's fence), and for a handoff's next incarnation the state it restores (JSON bytes,
    never decoded by the worker), the worker it comes from and when its handoff began
    (``time.time()``, for the ``forseti-process-moved`` event)."""

    epoch: int = 0
    state: bytes | None = None
    source: str | None = None
    since: float | None = None


@dataclass(frozen=True)
class Handing:
    """A process handing its state off (see :mod:`~forseti_celery.worker.handoff`): to worker
    ``to`` (None: wherever the leader places it), since ``since`` (``time.time()``), until
    ``deadline`` (``time.monotonic()``): a snapshot later than that is dropped."""

    to: str | None
    since: float
    deadline: float


@dataclass(eq=False)
class Child:
    """The worker's record of one keyed process.

    :attr:`process`, :attr:`conn`, :attr:`conn_fd` and :attr:`outbox` never change. The fields
    marked *(table)* are read and written under :attr:`Table.lock`; *(watcher)*: by the watcher
    thread only.
    """

    name: str  # (table): a spare is given its name, key, sid and args when it is given a key
    key: str  # (table)
    sid: str  # (table): the leader's latest order for the key names it
    process: Any
    conn: Any
    conn_fd: int
    #: Its mailbox: what it has not taken off its pipe yet.
    outbox: Outbox
    started_at: float = field(default_factory=time.time)  # (table)
    #: (table) The init args of its key (``None`` for a spare): a rebuilt leader gets them back
    #: from :meth:`~forseti_celery.worker.pool.children.Children.registry_args`.
    args: list[Any] | None = None
    started: bool = False  # (table)
    messages: int = 0  # (table)
    #: (table) Calls delivered and not answered yet: correlation id -> reply queue.
    calls: dict[str, str] = field(default_factory=dict)
    #: (table) Of :attr:`calls`, the key-addressed ones: if it dies with one, it had taken it
    #: (never answered "gone", which would have its caller send it again).
    ka_calls: set[str] = field(default_factory=set)
    #: (table) Who asked it to stop (answered with its exit report).
    stoppers: list[Waiter] = field(default_factory=list)
    #: (table) When it is killed if it has not ended by then (asked to stop).
    kill_at: float | None = None
    gone: bool = False  # (table): reaped
    #: (table) Times the leader restarted its key (the spawn order's ``restarts``), reported back.
    restarts: int = 0
    #: (table) Seconds it may go without a cast or call before it is passivated (set as it
    #: starts, from its name's ``idle_timeout``; None: never), and when it last had one
    #: (``time.monotonic()``): see :mod:`~forseti_celery.worker.pool.idle`.
    idle_after: float | None = None
    active_at: float = 0.0
    #: (table) Stopped for being idle: a key-addressed message for it is held, not written.
    passivating: bool = False
    #: (table) Answered (``Reply.ok(corr, None)`` to ``[reply queue, correlation id]``) once it
    #: is reaped, after its exit report: how the node learns that a key it holds messages for is free.
    exit_waiters: list[Waiter] = field(default_factory=list)
    #: (table) Callers to answer directly when it has started (``[reply queue, correlation id]``).
    waiters: list[list[str]] = field(default_factory=list)
    #: (table) Forked ahead, waiting for a key.
    spare: bool = False
    #: (watcher) Its pipe and exit are polled (a spare's only from the watcher's next round on).
    #: The consumer thread reads it as a hint only: to wake the watcher for a spare it gives a key.
    watched: bool = False
    init_error: tuple[str, str] | None = None  # (watcher): what its init raised
    reason: str | None = None  # (watcher): why it exited, as it said
    #: (watcher) Crash answers, sent once its exit is reported.
    last_words: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: (watcher) Bytes read from the pipe that do not make a whole frame yet.
    partial: bytearray = field(default_factory=bytearray)
    #: (table) Handing off: sent a ``handoff`` (it takes no key-addressed message any more).
    handing: Handing | None = None
    #: (watcher) Its ``snapshot()`` as JSON bytes, once it has handed off in time.
    state: bytes | None = None
    #: (table) A handoff's next incarnation: the worker it came from, and when its handoff began.
    moved_from: tuple[str, float] | None = None

    @property
    def pid(self) -> int:
        return int(self.process.pid)


class Table:
    """The keyed processes of one worker by key, its spares and the keys ordered but not forked
    yet; every field is read and written under :attr:`lock` (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: Keyed processes by ``(name, key)``, from their fork (or a spare's key) to their reap.
        self.by_key: dict[Key, Child] = {}
        #: Ordered, not forked yet: ``(name, key)`` -> ``(sid, args)``.
        self.pending: dict[Key, tuple[str, list[Any]]] = {}
        #: The restart count of each pending order of a restarted key (see :attr:`Child.restarts`).
        self.restarts: dict[Key, int] = {}
        #: Spares forked and waiting for a key, oldest first.
        self.spares: deque[Child] = deque()
        #: Forked, not polled by the watcher yet (it takes them on its next round).
        self.new: list[Child] = []
        #: Asked to stop, with a kill deadline (:attr:`Child.kill_at`).
        self.dying: set[Child] = set()
        #: Key-addressed messages reaped processes had not taken, in order, for the node to
        #: hold for their key's next incarnation (put by the watcher, taken by the consumer thread).
        self.untaken: dict[Key, list[dict[str, Any]]] = {}

    def report(self) -> tuple[list[list[Any]], list[list[Any] | None], list[int]]:
        """``[name, key, pid or None while starting, sid]`` of every process here, ordered ones
        not forked yet included (a restart held for its back-off too), each one's init args (a
        parallel list, ``None`` where unknown) and restart count (parallel). Under :attr:`lock`."""
        procs = [[c.name, c.key, c.pid if c.started else None, c.sid] for c in self.by_key.values()]
        args: list[list[Any] | None] = [c.args for c in self.by_key.values()]
        restarts = [c.restarts or self.restarts.get((c.name, c.key), 0) for c in self.by_key.values()]
        for (name, key), (sid, a) in self.pending.items():
            if (name, key) not in self.by_key:
                procs.append([name, key, None, sid])
                args.append(a)
                restarts.append(self.restarts.get((name, key), 0))
        return procs, args, restarts

    def inherited_fds(self) -> list[int]:
        """The worker's ends of every child's pipe (a new fork must close them). Under :attr:`lock`."""
        return [c.conn_fd for c in (*self.by_key.values(), *self.spares)]


def untaken_key_addressed(c: Child, msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of ``msgs``, which ``c`` never took (:meth:`~forseti_celery.worker.pool.outbox.Outbox.close`),
    the key-addressed ones, in order: their calls are no longer ``c``'s to answer, they go to the
    key's next incarnation. The others stay as they were (a cast dropped, a call answered "gone").
    Under :attr:`Table.lock`."""
    kept = [m for m in msgs if m.get(KEY_ADDRESSED) and m[TYPE] in (CALL, CAST)]
    for m in kept:
        if m[TYPE] == CALL:
            c.calls.pop(m[CORR], None)
            c.ka_calls.discard(m[CORR])
    return kept
