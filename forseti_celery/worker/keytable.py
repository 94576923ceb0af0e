"""The leader's table: ``(name, key) -> Entry`` (where each key's process runs, or is starting),
the keys and the count of each worker, and placement on the least-used one.

Owned by :class:`~forseti_celery.worker.leader.Leader`, in the consumer thread of the worker that
leads: no lock. Every operation is O(1) in the number of keys (placement is O(workers)).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..core.worker_messages import Report
from .membership import Members

__all__ = ["Entry", "Key", "KeyTable", "Moving", "Waiter", "Waiters", "reported_entries", "unplaceable"]

Key = tuple[str, str]
Waiter = tuple[str, str]  # (reply routing key, correlation id)
Waiters = dict[Waiter, float]  # -> when its caller gives up (``time.time()``; inf: never said)


@dataclass(frozen=True)
class Moving:
    """A key on its way from one worker to another (a handoff, see :mod:`~forseti_celery.worker.moves`):
    the state its next process restores (JSON bytes), the worker it left, when its handoff began
    (``time.time()``) and the worker it is to go to (None: the least-used one)."""

    state: bytes | None
    source: str
    since: float
    target: str | None = None


@dataclass
class Entry:
    """One key's process: starting (``pid is None``) or live."""

    node: str
    sid: str
    #: The key's init args, for as long as the key lives (a rebuilt leader gets them back from the
    #: worker's report); None where unknown (reported by a worker older than that field).
    args: list[Any] | None
    pid: int | None = None
    #: Callers of ``get_key`` waiting for it to start, until their deadline (see :meth:`Leader.expire`).
    waiters: Waiters = field(default_factory=dict)
    #: When the leader recorded it, in its own count of records: a worker's report answers
    #: for the entries recorded before it was asked for, never for later ones.
    seq: int = 0
    #: When it was placed, or (a restart held for its back-off) when its worker starts it.
    since: float = field(default_factory=time.monotonic)
    #: The waiters the worker answers itself when the process has started (sent with its order).
    told: frozenset[Waiter] = frozenset()
    #: Times the leader restarted the key (its restart policy), carried by its spawn order and
    #: reported back by its worker (see :mod:`~forseti_celery.worker.restarts`).
    restarts: int = 0
    #: A restart not started yet: why its previous process ended (for the restarted event);
    #: None once started, and for any other start.
    restarting: str | None = None
    #: A handoff's next incarnation not started yet: its state (placed again with it if its
    #: worker refuses it or dies first); None once started.
    moving: Moving | None = None

    @property
    def wanted(self) -> bool:
        """Whether a start not made (its order lost or refused, its worker gone) is placed again:
        someone waits for it, or it is a restart or a handoff's next incarnation."""
        return bool(self.waiters) or self.restarting is not None or self.moving is not None


class KeyTable:
    """Where each key runs, and how many processes each worker has (the leader's, no lock)."""

    def __init__(self) -> None:
        self.entries: dict[Key, Entry] = {}
        self.by_node: dict[str, set[Key]] = {}
        self.counts: dict[str, int] = {}
        #: The entries whose process has not reported its start yet.
        self.starting: dict[Key, Entry] = {}
        #: The leader's count of records (see :attr:`Entry.seq`).
        self.seq = 0

    def clear(self) -> None:
        self.entries.clear()
        self.by_node.clear()
        self.counts.clear()
        self.starting.clear()

    def get(self, k: Key) -> Entry | None:
        return self.entries.get(k)

    def record(self, node: str, k: Key, entry: Entry) -> bool:
        """Record ``entry`` for ``k`` on ``node``; False when another worker has the key already
        (two workers report one key only after a split brain: the caller stops the latter)."""
        old = self.entries.get(k)
        if old is not None:
            if old.node == node and old.pid in (entry.pid, None):
                if old.args is None:
                    old.args = entry.args  # first known from this report (the worker runs a newer version)
                old.restarts = max(old.restarts, entry.restarts)
                return True  # known (or starting there: its start report is on the way)
            return False
        entry.seq, self.seq = self.seq, self.seq + 1
        self.entries[k] = entry
        if entry.pid is None:
            self.starting[k] = entry
        self.by_node.setdefault(node, set()).add(k)
        self.counts[node] = self.counts.get(node, 0) + 1
        return True

    def forget(self, k: Key, entry: Entry) -> None:
        del self.entries[k]
        self.starting.pop(k, None)
        self.by_node.get(entry.node, set()).discard(k)
        self.counts[entry.node] = max(0, self.counts.get(entry.node, 1) - 1)

    def drop_node(self, hostname: str) -> list[tuple[Key, Entry]]:
        """Forget a worker and every key it had; returns them."""
        keys = self.by_node.pop(hostname, set())
        self.counts.pop(hostname, None)
        dropped = []
        for k in keys:
            dropped.append((k, self.entries.pop(k)))
            self.starting.pop(k, None)
        return dropped

    def expire_waiters(self, now: float) -> None:
        """Forget the callers of keys still starting whose deadline (``time.time()``) passed."""
        for entry in self.starting.values():
            gone = [w for w, deadline in entry.waiters.items() if deadline < now]
            for w in gone:
                del entry.waiters[w]

    def least_used(self, members: Members, name: str | None, avoid: str | None = None) -> str | None:
        """The eligible live worker (knowing ``name``) with the fewest processes; ties by hostname.
        ``avoid`` only when no other is eligible."""
        best: tuple[bool, int, str] | None = None
        for m in members:
            if m.eligible and (name is None or name in m.names):
                cand = (m.hostname == avoid, self.counts.get(m.hostname, 0), m.hostname)
                if best is None or cand < best:
                    best = cand
        return None if best is None else best[2]


def unplaceable(members: Members, name: str) -> tuple[str, str]:
    """Why no worker takes a key of ``name``: the error kind its callers get, and its text."""
    if not any(name in m.names for m in members):
        return "unknown_name", f"no worker knows the keyed-process name {name!r}"
    return "timeout", f"no eligible live worker for {name!r}"


def reported_entries(msg: Report) -> list[tuple[Key, Entry]]:
    """A worker's registry as the leader's entries: a pending order with restarts is a restart
    held for its back-off (its restarted event says the previous end is unknown to this leader)."""
    return [((name, key), Entry(msg.node, sid, args, pid, restarts=restarts,
                                restarting="unknown" if pid is None and restarts else None))
            for (name, key, pid, sid), args, restarts in zip(msg.procs, _reported_args(msg), _reported_restarts(msg),
                                                             strict=True)]


def _reported_args(msg: Report) -> list[list[Any] | None]:
    """The init args of each entry of a report's ``procs``: its ``a`` (parallel to ``procs``), each
    a list or None; all None when the report has none (a worker older than the field) or one that
    does not match ``procs`` (a broken or forged report costs only the args, not the registry)."""
    procs, args = msg.procs, msg.args
    if type(args) is not list or len(args) != len(procs):
        return [None] * len(procs)
    return [a if type(a) is list else None for a in args]


def _reported_restarts(msg: Report) -> list[int]:
    """Each entry's restart count (:attr:`Report.restarts`, parallel to ``procs``); 0 where unknown."""
    rs = msg.restarts
    if type(rs) is not list or len(rs) != len(msg.procs):
        return [0] * len(msg.procs)
    return [r if type(r) is int and r >= 0 else 0 for r in rs]
