"""The leader: owner of the table ``(name, key) -> (node, pid)`` and of placement.

Runs in the consumer thread of the worker that holds the role, so its state needs
no lock. On taking the role it first asks every live worker for its registry and
answers nothing those registries could change until all have reported (or been
declared dead): requests that arrive meanwhile wait in order. Every request costs O(1) in the number of keys
(placement is O(workers)).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery.utils.log import get_logger

from ..core import protocol as p
from ..core.errors import InvalidMessage
from ..core.messages import Get, Metrics, Reply, Search, Stop, StopKey
from ..core.worker_messages import WIRE_KINDS, Exited, Heartbeat, Report, ReportRequest, Spawn, Spawned, SpawnFailed
from .membership import Members

logger = get_logger(__name__)

__all__ = ["Leader"]

Key = tuple[str, str]
Waiter = tuple[str, str]  # (reply routing key, correlation id)
Waiters = dict[Waiter, float]  # -> when its caller gives up (``time.time()``; inf: never said)
Send = Callable[[str, dict[str, Any]], None]  # (routing key, message)
#: What the leader queue carries for the leader: clients' requests and workers' start and exit reports.
Request = Get | Search | Metrics | StopKey | Spawned | SpawnFailed | Exited
_NODE_MESSAGES = (Spawned, SpawnFailed, Exited)


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
    since: float = field(default_factory=time.monotonic)
    #: The waiters the worker answers itself when the process has started (sent with its order).
    told: frozenset[Waiter] = frozenset()


class Leader:
    """Arbitration state; every method is called from the owning worker's consumer thread."""

    def __init__(self, hostname: str, members: Members, send_node: Send, reply: Send) -> None:
        self.hostname = hostname
        self.members = members
        self._send_node = send_node
        self._reply = reply
        self.active = False
        self.ready = False
        self.epoch = 0
        #: The election's fencing token (Redis), fixed for the whole term; None: the epoch is the
        #: highest any worker has seen, plus one (RabbitMQ, whose broker decides who leads).
        self._token: int | None = None
        self._table: dict[Key, Entry] = {}
        self._by_node: dict[str, set[Key]] = {}
        self._counts: dict[str, int] = {}
        self._awaiting: set[str] = set()
        self._suspects: set[str] = set()
        self._asked: dict[str, float] = {}
        self._seq = 0
        self._starting: dict[Key, Entry] = {}
        self._deferred: list[Request] = []
        self._deferred_exits: set[Key] = set()
        self._next_expiry = 0.0
        self._handlers: dict[str, Callable[[Any], None]] = {
            p.GET: self._get, p.SEARCH: self._search, p.METRICS: self._metrics, p.STOP_KEY: self._stop,
            p.SPAWNED: self._spawned, p.SPAWN_FAILED: self._spawn_failed, p.EXITED: self._exited,
        }

    # -- role -------------------------------------------------------------------------
    def activate(self, seen_epoch: int, token: int | None = None) -> None:
        """Take the role: ask every live worker for its registry, and answer nothing until each
        has reported or been declared dead (the previous leader too: if it only lost its
        connection or hangs, its processes live until they fence themselves). With the
        election's fencing ``token``, that is the epoch of the whole term."""
        self.deactivate()
        self.active = True
        self._token = token
        self.epoch = seen_epoch if token is None else token - 1  # the term's epoch once ready
        self._awaiting = {m.hostname for m in self.members} | {self.hostname}
        logger.info("forseti: %s takes the leader role; rebuilding from %d workers",
                    self.hostname, len(self._awaiting))
        for host in sorted(self._awaiting):
            self._ask(host, self.epoch + 1)

    def deactivate(self) -> None:
        """Drop the role and everything learnt with it."""
        if self.active:
            logger.info("forseti: %s no longer leads", self.hostname)
        self.active = self.ready = False
        self._table.clear()
        self._by_node.clear()
        self._counts.clear()
        self._awaiting.clear()
        self._deferred.clear()
        self._deferred_exits.clear()
        self._suspects.clear()
        self._asked.clear()
        self._starting.clear()

    def report(self, wire: dict[str, Any]) -> None:
        """A worker's registry: during the rebuild, or asked for to reconcile (see :meth:`heartbeat`)."""
        msg = Report.from_wire(wire)
        host = msg.node
        if not self.active:
            return
        if self.ready:
            self._reconcile(host, msg.procs, _reported_args(msg), msg.q)
            return
        if host not in self._awaiting:
            return
        self._awaiting.discard(host)
        self._asked.pop(host, None)
        if self._token is None:
            self.epoch = max(self.epoch, msg.epoch)
        self._counts.setdefault(host, 0)
        for (name, key, pid, sid), args in zip(msg.procs, _reported_args(msg), strict=True):
            self._record(host, (name, key), Entry(host, sid, args, pid))
        self._maybe_ready()

    def heartbeat(self, wire: dict[str, Any]) -> None:
        """Compare a worker's own count with the table; ask for its registry when they disagree
        twice in a row, when the worker is new to the table (joined, or came back), or when a
        process placed there has not reported its start for a while (its order or its start
        report may have been lost)."""
        hb = Heartbeat.from_wire(wire)
        host = hb.node
        if self.active and not self.ready and host in self._awaiting and host != self.hostname:
            # Our request may have been lost (its queue did not exist yet after a broker restart).
            self._ask_again(host, self.epoch + 1, self.members.node_timeout / 4)
            return
        if not self.ready or host not in self.members:
            return
        late = time.monotonic() - self.members.node_timeout / 4
        if any(e.node == host and e.since < late for e in self._starting.values()):
            self._ask_again(host, self.epoch, 2 * self.members.node_timeout / 3)
            return
        if host in self._counts and hb.count == self._counts[host]:
            self._suspects.discard(host)
            return
        if host in self._counts and host not in self._suspects:
            self._suspects.add(host)  # may be messages in flight: look again next beat
            return
        self._suspects.discard(host)
        self._ask_again(host, self.epoch, 2 * self.members.node_timeout / 3)

    def _ask_again(self, host: str, epoch: int, after: float) -> None:
        if time.monotonic() - self._asked.get(host, 0.0) > after:
            self._ask(host, epoch)

    def _ask(self, host: str, epoch: int) -> None:
        self._asked[host] = time.monotonic()
        self._send_node(host, ReportRequest(self.hostname, epoch, self._seq).to_wire())

    def _reconcile(self, host: str, procs: list[list[Any]], args: list[list[Any] | None], asked_at: int) -> None:
        self._asked.pop(host, None)
        if host not in self.members:
            return
        self._counts.setdefault(host, 0)
        reported = {(name, key): (pid, sid) for name, key, pid, sid in procs}
        known = {(name, key): a for (name, key, _, _), a in zip(procs, args, strict=True)}
        for k in list(self._by_node.get(host, ())):
            entry = self._table[k]
            if entry.seq >= asked_at:
                continue  # recorded after the question: the answer cannot know it yet
            pid, sid = reported.get(k, (None, None))
            if entry.pid is None:
                if pid is not None:
                    entry.sid = sid
                    self._started(k, entry, pid, answer_all=True)  # its start report (and answers?) were lost
                elif sid != entry.sid:
                    # Its order was lost, or refused: place it again, for whoever still waits.
                    logger.info("forseti: %r never started on %s; placed again", k, host)
                    self._forget(k, entry)
                    if entry.waiters:
                        self._start(k, entry.args, entry.waiters)
            elif pid != entry.pid:
                logger.info("forseti: %r is no longer on %s; freed", k, host)
                self._forget(k, entry)  # its exit report was lost
        for k, (pid, sid) in reported.items():
            if pid is not None:
                self._record(host, k, Entry(host, sid, known[k], pid))

    def node_lost(self, hostname: str) -> None:
        """A worker died or left: its keys are free; keys it was starting are placed again."""
        self._awaiting.discard(hostname)
        keys = self._by_node.pop(hostname, set())
        self._counts.pop(hostname, None)
        restart: list[tuple[Key, Entry]] = []
        for k in keys:
            entry = self._table.pop(k)
            self._starting.pop(k, None)
            if entry.pid is None and entry.waiters:
                restart.append((k, entry))
        if keys:
            logger.info("forseti: worker %s lost; %d keys freed", hostname, len(keys))
        for k, entry in restart:
            self._start(k, entry.args, entry.waiters)
        if self.active:
            self._maybe_ready()

    def _maybe_ready(self) -> None:
        if self.ready or self._awaiting:
            return
        self.epoch = self.epoch + 1 if self._token is None else self._token
        self.ready = True
        logger.info("forseti: %s leads (epoch %d) with %d keys on %d workers",
                    self.hostname, self.epoch, len(self._table), len(self._counts))
        deferred, self._deferred = self._deferred, []
        self._deferred_exits.clear()
        for msg in deferred:
            try:
                self._handle(msg)
            except Exception:  # a malformed request (clients write to the leader queue) costs only itself
                logger.exception("forseti: %s skipped a malformed deferred %r message", self.hostname, msg.T)

    # -- messages ---------------------------------------------------------------------
    def handle(self, msg: dict[str, Any]) -> None:
        """A message from the leader queue; during the rebuild, only what :meth:`_settled` allows."""
        kind = msg.get("t")
        if type(kind) is not str or kind not in self._handlers:
            return
        try:
            typed = WIRE_KINDS[kind].from_wire(msg)
        except InvalidMessage as exc:  # lacks a field its kind needs: it costs only itself
            logger.warning("forseti: %s skipped a malformed %r message: %s", self.hostname, kind, exc)
            return
        self._handle(typed)

    def _handle(self, msg: Request) -> None:
        if not self.ready and not self._settled(msg):
            self._deferred.append(msg)
            if isinstance(msg, Exited):
                self._deferred_exits.add((msg.name, msg.key))
            return
        if not isinstance(msg, _NODE_MESSAGES) and _deadline(msg) < time.time():
            return  # the caller has given up already
        self._handlers[msg.T](msg)

    def _settled(self, msg: Request) -> bool:
        """Whether the rebuilding table already answers ``msg`` as the complete one will.

        A key the table has as live was reported by its worker, and no other worker runs it
        (one process per key), so reports still awaited cannot change the answer to a lookup
        of it, nor its freeing by an exit report naming that very process. Every other message
        waits, in order, for the complete table.
        """
        if not isinstance(msg, (Get, Search, Exited)):
            return False
        k = (msg.name, msg.key)
        entry = self._table.get(k)
        if entry is None or entry.pid is None or k in self._deferred_exits:
            return False  # (an exit report that came before its worker's registry may name it)
        return not isinstance(msg, Exited) or (entry.node, entry.pid, entry.sid) == (msg.node, msg.pid, msg.sid)

    def _get(self, msg: Get) -> None:
        k = (msg.name, msg.key)
        waiter = (msg.reply_to, msg.corr)
        entry = self._table.get(k)
        if entry is None:
            self._start(k, msg.args, {waiter: _deadline(msg)})
        elif entry.pid is not None:
            self._answer(waiter, k, entry)
        else:
            entry.waiters[waiter] = _deadline(msg)

    def expire(self, now: float | None = None) -> None:
        """Forget the callers of keys still starting who have given up (their deadline passed): a
        key whose init hangs keeps no waiter per ``get_key`` forever. At most once a second."""
        now = time.time() if now is None else now
        if now < self._next_expiry:
            return
        self._next_expiry = now + 1.0
        for entry in self._starting.values():
            gone = [w for w, deadline in entry.waiters.items() if deadline < now]
            for w in gone:
                del entry.waiters[w]

    def _search(self, msg: Search) -> None:
        entry = self._table.get((msg.name, msg.key))
        live = entry is not None and entry.pid is not None
        self._reply(msg.reply_to, Reply.ok(msg.corr, [entry.node, entry.pid] if live else None).to_wire())  # type: ignore[union-attr]

    def _metrics(self, msg: Metrics) -> None:
        counts = {m.hostname: self._counts.get(m.hostname, 0) for m in self.members if m.eligible}
        self._reply(msg.reply_to, Reply.ok(msg.corr, counts).to_wire())

    def _stop(self, msg: StopKey) -> None:
        entry = self._table.get((msg.name, msg.key))
        if entry is None or entry.node != msg.node or entry.pid != msg.pid:
            self._reply(msg.reply_to, Reply.ok(msg.corr, True).to_wire())  # gone already: its key is free
            return
        # The worker stops it; its exit report names the stopper, answered once the key is free.
        self._send_node(entry.node, msg.forwarded().to_wire())

    def _spawned(self, msg: Spawned) -> None:
        """A start report counts only for the process this leader placed on that very worker (its
        sid): another process of the key is stopped, a process it knows nothing of is asked about."""
        k = (msg.name, msg.key)
        entry = self._table.get(k)
        if entry is not None and (entry.node, entry.sid) == (msg.node, msg.sid):
            if entry.pid is None:
                self._started(k, entry, msg.pid)
        elif entry is None:
            # Started on an order this leader did not give (a deposed leader's), or never: its
            # worker's registry says which, and the process is recorded from there.
            if msg.node in self.members:
                self._ask_again(msg.node, self.epoch, self.members.node_timeout / 4)
        elif (entry.node, entry.pid) != (msg.node, msg.pid):  # never the process the table holds
            logger.warning("forseti: duplicate process for %r on %s; stopping it", k, msg.node)
            self._send_node(msg.node, Stop(k[0], k[1], msg.pid, "duplicate").to_wire())

    def _spawn_failed(self, msg: SpawnFailed) -> None:
        k = (msg.name, msg.key)
        entry = self._table.get(k)
        if entry is None or entry.sid != msg.sid:
            return
        self._forget(k, entry)
        if msg.error == "unavailable":
            # The worker is stopping or cut off: not a failure of the key. Elsewhere, then; with
            # nowhere else to go, its callers ask again (every forseti_retry_interval) meanwhile.
            self.members.exclude(msg.node)
            if self.least_used(k[0]) is not None:
                self._start(k, entry.args, entry.waiters)
            return
        for reply_to, corr in entry.waiters:
            self._reply(reply_to, Reply.fail(corr, msg.error, msg.text or "", msg.exc_type or "").to_wire())

    def _started(self, k: Key, entry: Entry, pid: int, answer_all: bool = False) -> None:
        entry.pid = pid
        self._starting.pop(k, None)
        for waiter in entry.waiters:
            if answer_all or waiter not in entry.told:
                self._answer(waiter, k, entry)
        entry.waiters.clear()

    def _exited(self, msg: Exited) -> None:
        k = (msg.name, msg.key)
        entry = self._table.get(k)
        if entry is not None and entry.pid is not None and (
                (entry.node, entry.pid, entry.sid) == (msg.node, msg.pid, msg.sid)):
            self._forget(k, entry)
        for reply_to, corr in msg.stoppers:
            self._reply(reply_to, Reply.ok(corr, True).to_wire())

    # -- table ------------------------------------------------------------------------
    def _start(self, k: Key, args: list[Any] | None, waiters: Waiters) -> None:
        node = self.least_used(k[0])
        if node is None:
            known = any(k[0] in m.names for m in self.members)
            error = "unknown_name" if not known else "timeout"
            text = (f"no worker knows the keyed-process name {k[0]!r}" if not known
                    else f"no eligible live worker for {k[0]!r}")
            for reply_to, corr in waiters:
                self._reply(reply_to, Reply.fail(corr, error, text).to_wire())
            return
        entry = Entry(node, uuid.uuid4().hex, args, waiters=dict(waiters), told=frozenset(waiters))
        self._record(node, k, entry)
        # The worker answers these callers itself once the process has started: one hop less.
        self._send_node(node, Spawn(k[0], k[1], [] if args is None else args, entry.sid, self.epoch, self.hostname,
                                    [list(w) for w in waiters]).to_wire())

    def least_used(self, name: str | None) -> str | None:
        """The eligible live worker (knowing ``name``) with the fewest processes; ties by hostname."""
        best: tuple[int, str] | None = None
        for m in self.members:
            if m.eligible and (name is None or name in m.names):
                cand = (self._counts.get(m.hostname, 0), m.hostname)
                if best is None or cand < best:
                    best = cand
        return None if best is None else best[1]

    def _record(self, node: str, k: Key, entry: Entry) -> None:
        old = self._table.get(k)
        if old is not None:
            if old.node == node and old.pid in (entry.pid, None):
                if old.args is None:
                    old.args = entry.args  # first known from this report (the worker runs a newer version)
                return  # known (or starting there: its start report is on the way)
            # Two workers report one key (only after a split brain): keep the first, stop the other.
            logger.warning("forseti: %r reported by %s and %s; stopping the latter", k, old.node, node)
            self._send_node(node, Stop(k[0], k[1], entry.pid, "duplicate").to_wire())
            return
        entry.seq, self._seq = self._seq, self._seq + 1
        self._table[k] = entry
        if entry.pid is None:
            self._starting[k] = entry
        self._by_node.setdefault(node, set()).add(k)
        self._counts[node] = self._counts.get(node, 0) + 1

    def _forget(self, k: Key, entry: Entry) -> None:
        del self._table[k]
        self._starting.pop(k, None)
        self._by_node.get(entry.node, set()).discard(k)
        self._counts[entry.node] = max(0, self._counts.get(entry.node, 1) - 1)

    def _answer(self, waiter: Waiter, k: Key, entry: Entry) -> None:
        self._reply(waiter[0], Reply.ok(waiter[1], [entry.node, entry.pid]).to_wire())

    def args_of(self, name: str, key: str) -> list[Any] | None:
        """The init args the table has for a key (None: no such key, or its args are unknown)."""
        entry = self._table.get((name, key))
        return None if entry is None else entry.args

    def info(self) -> dict[str, Any]:
        """Summary for ``celery inspect stats``: ``with_args``, the keys whose init args it knows."""
        return {"keys": len(self._table), "epoch": self.epoch, "ready": self.ready,
                "with_args": sum(e.args is not None for e in self._table.values())}


def _reported_args(msg: Report) -> list[list[Any] | None]:
    """The init args of each entry of a report's ``procs``: its ``a`` (parallel to ``procs``), each
    a list or None; all None when the report has none (a worker older than the field) or one that
    does not match ``procs`` (a broken or forged report costs only the args, not the registry)."""
    procs, args = msg.procs, msg.args
    if type(args) is not list or len(args) != len(procs):
        return [None] * len(procs)
    return [a if type(a) is list else None for a in args]


def _deadline(msg: Get | Search | Metrics | StopKey) -> float:
    """When the sender of a request gives up (``time.time()``); inf when it says not."""
    return float("inf") if msg.deadline is None else msg.deadline
