"""The leader: owner of the table ``(name, key) -> (node, pid)`` (:mod:`.keytable`), placement,
and restarts (:mod:`.restarts`). Runs in the consumer thread of the worker that holds the role:
no lock. On taking the role it first asks every live worker for its registry and answers nothing
those registries could change until all have reported (or been declared dead): requests that
arrive meanwhile wait in order. Each request is O(1) in the number of keys (placement O(workers)).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.utils.log import get_logger

from ..core import protocol as p
from ..core.errors import InvalidMessage
from ..core.messages import TYPE, Get, Metrics, Reply, Search, Stop, StopKey
from ..core.worker_messages import (
    REASON_HANDOFF,
    WIRE_KINDS,
    Exited,
    Heartbeat,
    Report,
    ReportRequest,
    Spawn,
    Spawned,
    SpawnFailed,
)
from . import moves
from .keytable import Entry, Key, KeyTable, Moving, Waiter, Waiters, reported_entries, unplaceable
from .membership import Members
from .rebalance import Rebalancer
from .reconcile import reconcile
from .restarts import WORKER_LOST, Restarts

if TYPE_CHECKING:
    from ..core.conf import KeyPolicy

logger = get_logger(__name__)

__all__ = ["Leader"]

Send = Callable[[str, dict[str, Any]], None]  # (routing key, message)
#: What the leader queue carries for the leader: clients' requests and workers' start and exit reports.
Request = Get | Search | Metrics | StopKey | Spawned | SpawnFailed | Exited
_NODE_MESSAGES = (Spawned, SpawnFailed, Exited)


class Leader:
    """Arbitration state; every method is called from the owning worker's consumer thread."""

    def __init__(self, hostname: str, members: Members, send_node: Send, reply: Send,
                 policy: Callable[[str], KeyPolicy | None] = lambda name: None,
                 event: Callable[..., None] = lambda type_, **fields: None) -> None:
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
        self._keys = KeyTable()
        self._table, self._counts, self._starting = self._keys.entries, self._keys.counts, self._keys.starting
        self.restarts = Restarts(policy, event)
        self.rebalancer = Rebalancer()  # its settings and the worker's movable names: set by the node
        self._awaiting: set[str] = set()
        self._suspects: set[str] = set()
        self._asked: dict[str, float] = {}
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
        for host in set(self.restarts.leaders()) - self._awaiting:
            self.node_lost(host)  # a leader declared dead before we led: its own worker's keys

    def deactivate(self) -> None:
        """Drop the role and everything learnt with it."""
        if self.active:
            logger.info("forseti: %s no longer leads", self.hostname)
        self.active = self.ready = False
        self._keys.clear()
        self.restarts.clear()
        self.rebalancer.clear()
        self._awaiting.clear()
        self._deferred.clear()
        self._deferred_exits.clear()
        self._suspects.clear()
        self._asked.clear()

    def report(self, wire: dict[str, Any]) -> None:
        """A worker's registry: during the rebuild, or asked for to reconcile (see :meth:`heartbeat`)."""
        msg = Report.from_wire(wire)
        host = msg.node
        if not self.active:
            return
        if self.ready:
            reconcile(self, host, msg)
            return
        if host not in self._awaiting:
            return
        self._awaiting.discard(host)
        self._asked.pop(host, None)
        if self._token is None:
            self.epoch = max(self.epoch, msg.epoch)
        self._counts.setdefault(host, 0)
        for k, entry in reported_entries(msg):
            self._record(host, k, entry)
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
        self._send_node(host, ReportRequest(self.hostname, epoch, self._keys.seq).to_wire())

    def node_lost(self, hostname: str) -> None:
        """A worker died or left: its keys are free; keys it was starting (a restart included) are
        placed again, and live ones restarted as their policy says."""
        self._awaiting.discard(hostname)
        unreported, orphans = hostname not in self._counts, self.restarts.orphans(hostname)
        dropped = self._keys.drop_node(hostname)
        if unreported:  # it led, and died before reporting to us: only its heartbeats told its keys
            dropped += [(k, e) for k, e in orphans if k not in self._table]
        if dropped:
            logger.info("forseti: worker %s lost; %d keys freed", hostname, len(dropped))
        for k, entry in dropped:
            if entry.pid is None and entry.wanted:
                self._start(k, entry.args, entry.waiters, entry)
            elif entry.pid is not None:
                self._ended(k, entry, WORKER_LOST)
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
        kind = msg.get(TYPE)
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
        self.rebalancer.tick(self)
        if (now := time.time() if now is None else now) < self._next_expiry:
            return
        self._next_expiry = now + 1.0
        self.restarts.sweep(time.monotonic())
        self._keys.expire_waiters(now)

    def _search(self, msg: Search) -> None:
        e = self._table.get((msg.name, msg.key))
        self._reply(msg.reply_to, Reply.ok(msg.corr, [e.node, e.pid] if e and e.pid is not None else None).to_wire())

    def _metrics(self, msg: Metrics) -> None:
        self._reply(msg.reply_to, Reply.ok(msg.corr, {m.hostname: self._counts.get(m.hostname, 0)
                                                      for m in self.members if m.eligible}).to_wire())

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
        self._keys.forget(k, entry)
        if msg.error == "unavailable":
            # The worker is stopping or cut off: not a failure of the key. Elsewhere, then; with
            # nowhere else to go, its callers ask again (every forseti_retry_interval) meanwhile.
            self.members.exclude(msg.node)
            if self._keys.least_used(self.members, k[0]) is not None:
                self._start(k, entry.args, entry.waiters, entry)
            return
        if entry.restarting is not None:
            logger.warning("forseti: restart of %r failed (%s: %s); the key stays down", k, msg.error, msg.text)
            self.restarts.give_up(k, entry.restarts, f"restart failed: {msg.error}")
        for reply_to, corr in entry.waiters:
            self._reply(reply_to, Reply.fail(corr, msg.error, msg.text or "", msg.exc_type or "").to_wire())

    def _started(self, k: Key, entry: Entry, pid: int, answer_all: bool = False) -> None:
        entry.pid = pid
        self._starting.pop(k, None)
        self.rebalancer.started(self, k, entry)
        if entry.restarting is not None:
            self.restarts.started(k, entry)
        for waiter in entry.waiters:
            if answer_all or waiter not in entry.told:
                self._answer(waiter, k, entry)
        entry.waiters.clear()

    def _exited(self, msg: Exited) -> None:
        k = (msg.name, msg.key)
        entry = self._table.get(k)
        ours = entry if entry is not None and entry.pid is not None and (entry.node, entry.pid, entry.sid) == (
            msg.node, msg.pid, msg.sid) else None
        if ours is not None:
            self._keys.forget(k, ours)
        if msg.reason == REASON_HANDOFF and (ours is not None or entry is None):  # only now its next one starts
            self._start(k, msg.args if ours is None or ours.args is None else ours.args, {},
                        moving=moves.exited(self.members, k, msg))
        elif ours is not None:
            self._ended(k, ours, msg.reason or "")
        elif msg.reason == REASON_HANDOFF:  # the key started afresh meanwhile (asked for before this came)
            logger.warning("forseti: %r handed off from %s after it started afresh: its state is dropped", k, msg.node)
        for reply_to, corr in msg.stoppers:
            self._reply(reply_to, Reply.ok(corr, True).to_wire())

    # -- table ------------------------------------------------------------------------
    def _start(self, k: Key, args: list[Any] | None, waiters: Waiters, prior: Entry | None = None,
               after: float = 0.0, moving: Moving | None = None) -> None:
        """Place ``k``: a new start, the restart ``prior`` (held ``after`` seconds by its worker),
        or a handoff's next process (``moving``, or ``prior``'s placed again)."""
        restarting = None if prior is None else prior.restarting
        moving = moving or (None if prior is None else prior.moving)
        # A restart held by the leader's own worker would die with it, unknown to the next leader.
        node = moves.place(self.members, self._keys, k, moving) if moving else self._keys.least_used(
            self.members, k[0], avoid=self.hostname if restarting is not None else None)
        if node is None:
            error, text = unplaceable(self.members, k[0])
            for reply_to, corr in waiters:
                self._reply(reply_to, Reply.fail(corr, error, text).to_wire())
            if restarting is not None:
                logger.warning("forseti: %r not restarted: %s", k, text)
                self.restarts.give_up(k, prior.restarts if prior else 0, restarting)
            return
        restarts = 0 if prior is None else prior.restarts
        entry = Entry(node, uuid.uuid4().hex, args, waiters=dict(waiters), told=frozenset(waiters),
                      since=time.monotonic() + after, restarts=restarts, restarting=restarting, moving=moving)
        self._record(node, k, entry)
        # The worker answers these callers itself once the process has started: one hop less.
        self._send_node(node, Spawn(k[0], k[1], [] if args is None else args, entry.sid, self.epoch, self.hostname,
                                    [list(w) for w in waiters], after or None, restarts or None,
                                    *moves.spawn_fields(moving)).to_wire())

    def _ended(self, k: Key, entry: Entry, reason: str) -> None:
        """``k``'s live process ended for ``reason`` (its entry forgotten): restarted after its
        back-off if its policy says so (and the restart intensity allows)."""
        backoff = self.restarts.after(k, entry, reason)
        if backoff is not None:
            prior = Entry(entry.node, entry.sid, entry.args, restarts=entry.restarts + 1, restarting=reason)
            self._start(k, entry.args, {}, prior, backoff)

    def _record(self, node: str, k: Key, entry: Entry) -> None:
        if not self._keys.record(node, k, entry):
            # Two workers report one key (only after a split brain): keep the first, stop the other.
            logger.warning("forseti: %r reported by %s and %s; stopping the latter", k, self._table[k].node, node)
            self._send_node(node, Stop(k[0], k[1], entry.pid, "duplicate").to_wire())

    def _answer(self, waiter: Waiter, k: Key, entry: Entry) -> None:
        self._reply(waiter[0], Reply.ok(waiter[1], [entry.node, entry.pid]).to_wire())

    def args_of(self, name: str, key: str) -> list[Any] | None:
        """The init args the table has for a key (None: no such key, or its args are unknown)."""
        return getattr(self._table.get((name, key)), "args", None)

    def info(self) -> dict[str, Any]:
        """Summary for ``celery inspect stats``: ``with_args``, the keys whose init args it knows."""
        return {"keys": len(self._table), "epoch": self.epoch, "ready": self.ready,
                "with_args": sum(e.args is not None for e in self._table.values()),
                "restarted": self.restarts.restarted, "given_up": self.restarts.given_up}


def _deadline(msg: Get | Search | Metrics | StopKey) -> float:
    """When the sender of a request gives up (``time.time()``); inf when it says not."""
    return float("inf") if msg.deadline is None else msg.deadline
