"""Rebalancing: the leader moves movable keys onto the workers that run fewest, by handoffs
(:mod:`~forseti_celery.worker.moves`), until every eligible worker's count differs by at most one.

With ``forseti_rebalance = "on_join"`` a run begins when a worker becomes eligible (joins, or
comes back); :meth:`Rebalancer.request` begins one on demand (``celery forseti rebalance``, the
``forseti_rebalance`` remote-control command, through ``worker.forseti.rebalance(timeout)``) and
waits for it. A run sends ``move`` orders (:class:`~forseti_celery.core.worker_messages.Move`) to
the workers that run most, at most ``forseti_rebalance_batch`` in flight at a time: each is the
handoff of one key to the worker that runs fewest (its callers see a pause, not an error), and the
next is sent as one completes (its new process started), so a join never stalls the cluster and
the leader never waits. A move that does not complete within ``forseti_handoff_timeout`` (its
snapshot failed, its process had gone) is given up; the run ends when nothing is left to move.

Threads: everything is the leader's consumer thread's, but :meth:`Rebalancer.request` (a control
command's thread), which only puts a request in a queue and waits for its event.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from celery.utils.log import get_logger

from ..core.worker_messages import Move
from .keytable import Entry, Key, KeyTable
from .membership import Members

logger = get_logger(__name__)

__all__ = ["Rebalancer"]

_GRACE = 5.0  # seconds past forseti_handoff_timeout before a move in flight is given up


class Leader(Protocol):
    """What of the :class:`~.leader.Leader` a rebalance reads, and how it sends its orders."""

    hostname: str
    epoch: int
    members: Members
    _keys: KeyTable
    _send_node: Callable[[str, dict[str, Any]], None]


@dataclass
class _Request:
    """An on-demand run: what it moved, and set once it has ended."""

    done: threading.Event = field(default_factory=threading.Event)
    moved: list[dict[str, str]] = field(default_factory=list)


class Rebalancer:
    """The leader's rebalancing runs and the moves they have in flight."""

    def __init__(self, mode: str = "off", batch: int = 10, timeout: float = 30.0,
                 movable: Callable[[str], bool] = lambda name: False) -> None:
        self.mode = mode
        self.batch = batch
        self.timeout = timeout
        self._movable = movable
        #: key -> (source, target, when it is given up: ``time.monotonic()``)
        self._inflight: dict[Key, tuple[str, str, float]] = {}
        self._known: set[str] | None = None  # the eligible workers at the last tick
        self._running = False
        self._waiting: list[_Request] = []
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        #: Keys moved by rebalancing (read by anyone: stats).
        self.moved = 0

    def request(self, timeout: float | None) -> list[dict[str, str]]:
        """Run now and wait for the run to end, ``timeout`` seconds at most (None:
        forseti_handoff_timeout): the moves completed, ``{"name", "key", "source", "target"}`` each
        (any thread but the leader's own; moves still in flight go on)."""
        req = _Request()
        self._requests.put(req)
        req.done.wait(self.timeout if timeout is None else timeout)
        return list(req.moved)

    def clear(self) -> None:
        """The role is left: no run, nothing in flight; waiting requests end."""
        self._inflight.clear()
        self._known = None
        self._end()

    # -- the leader's consumer thread ----------------------------------------------------------
    def tick(self, leader: Leader) -> None:
        """Begin a run on a join (``on_join``) or a request; give up overdue moves; move more."""
        eligible = {m.hostname for m in leader.members if m.eligible}
        if self._known is not None and eligible - self._known and self.mode == "on_join":
            logger.info("forseti: %s joined; rebalancing", ", ".join(sorted(eligible - self._known)))
            self._running = True
        self._known = eligible
        while True:
            try:
                self._waiting.append(self._requests.get_nowait())
            except queue.Empty:
                break
            self._running = True
        now = time.monotonic()
        for k, (_, _, until) in list(self._inflight.items()):
            if until < now:
                del self._inflight[k]
        if self._running:
            self._step(leader)

    def started(self, leader: Leader, k: Key, entry: Entry) -> None:
        """``k``'s process started (``entry``): a handoff's next one completes its move."""
        if entry.moving is None:
            return
        entry.moving = None  # its state is the new process's now
        move = self._inflight.pop(k, None)
        if move is None:
            return
        self.moved += 1
        done = {"name": k[0], "key": k[1], "source": move[0], "target": entry.node}
        for req in self._waiting:
            req.moved.append(done)
        if self._running:
            self._step(leader)

    def _step(self, leader: Leader) -> None:
        while len(self._inflight) < self.batch:
            plan = self._plan(leader)
            if plan is None:
                break
            k, entry, target = plan
            assert entry.pid is not None
            self._inflight[k] = (entry.node, target, time.monotonic() + self.timeout + _GRACE)
            leader._send_node(entry.node, Move(k[0], k[1], entry.pid, target, leader.hostname, leader.epoch).to_wire())
        if not self._inflight:
            self._end()

    def _end(self) -> None:
        self._running = False
        for req in self._waiting:
            req.done.set()
        self._waiting.clear()

    def _plan(self, leader: Leader) -> tuple[Key, Entry, str] | None:
        """The next move: a live movable key of a worker that runs at least two more than the one
        that runs fewest (counting the moves in flight), to that one; None when balanced."""
        keys = leader._keys
        table = keys.entries
        members = {m.hostname: m for m in leader.members if m.eligible}
        if len(members) < 2:
            return None
        counts = {h: keys.counts.get(h, 0) for h in members}
        for k, (source, target, _) in self._inflight.items():
            e = table.get(k)
            if e is not None and e.node == source:  # not left yet: counted where it was
                counts[source] = counts.get(source, 0) - 1
                counts[target] = counts.get(target, 0) + 1
        least = min(members, key=lambda h: (counts[h], h))
        names = members[least].names
        for source in sorted(members, key=lambda h: (-counts[h], h)):
            if counts[source] - counts[least] <= 1:
                return None
            for k in keys.by_node.get(source, ()):
                e = table[k]
                if e.pid is not None and k not in self._inflight and k[0] in names and self._movable(k[0]):
                    return k, e, least
        return None
