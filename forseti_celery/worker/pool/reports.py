"""What the pool sends out: reports to the leader (a start, an exit, a failed spawn) and answers
to callers, published together by the watcher thread, retried until the broker takes them.

Any thread adds (:meth:`Reports.report`, :meth:`Reports.reply`); only the watcher thread
publishes (:meth:`Reports.flush`). Reports go first: a caller told "gone" (or given a new
process) may ask the leader at once, and must find the key already freed (or recorded). A
child's answer goes into the reply broker message as the child encoded it: no thread of the
worker decodes or encodes a payload.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.utils.log import get_logger

from ...core import protocol as p
from ...core.errors import BrokerUnavailable
from ...core.messages import Reply
from ...core.worker_messages import Exited, Spawned, SpawnFailed

if TYPE_CHECKING:
    from .table import Child, Handing

logger = get_logger(__name__)

__all__ = ["InFlight", "Reports"]

_BODY = 1024 * 1024  # bytes of answers' values in one broker message at most, but for a single answer
_ROUTING_KEY = 255  # bytes of a routing key at most (AMQP's short string; py-amqp raises past it)

Publish = Callable[[list[tuple[str, list[dict[str, Any]]]]], None]


def _bodies(replies: dict[str, list[dict[str, Any]]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The answers to each reply queue in broker messages of at most :data:`_BODY` bytes of
    values (or one): many small answers share one, large ones do not add up past what a
    broker takes (RabbitMQ 4: 16 MiB)."""
    bodies = []
    for routing_key, msgs in replies.items():
        start = size = 0
        for i, m in enumerate(msgs):
            raw = m.get(p.PAYLOAD)
            n = len(raw.line) if isinstance(raw, p.Raw) else 0
            if i > start and size + n > _BODY:
                bodies.append((routing_key, msgs[start:i]))
                start, size = i, 0
            size += n
        bodies.append((routing_key, msgs[start:]))
    return bodies


class InFlight:
    """The calls written to keyed processes and not answered yet, counted by two owners:
    :attr:`taken`, the node's consumer thread (a call put in a process's ``calls``, less those it
    takes back for the key's next incarnation), and :attr:`done`, the watcher (a call answered, or
    its process reaped). Read without a lock, :attr:`waiting` is a hint: whether more answers may
    come now (the watcher looks again before it publishes only then)."""

    __slots__ = ("done", "taken")

    def __init__(self) -> None:
        self.taken = 0
        self.done = 0

    @property
    def waiting(self) -> bool:
        """Some call written to a keyed process has not been answered (a hint)."""
        return self.taken > self.done


class Reports:
    """The leader reports and caller answers not published yet.

    :attr:`_outbox` is a deque: appended by any thread, popped by the watcher once published
    (deque appends and pops are atomic). :attr:`_replies` is swapped under :attr:`_lock`.
    """

    def __init__(self, hostname: str, leader_rk: str, publish: Publish, wake: Callable[[], None]) -> None:
        self.hostname = hostname
        self._leader_rk = leader_rk
        self._publish = publish
        self._wake = wake
        self._outbox: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._replies: dict[str, list[dict[str, Any]]] = {}
        #: Calls in keyed processes' hands (see :class:`InFlight`).
        self.in_flight = InFlight()

    @property
    def empty(self) -> bool:
        """No report waits (every exit has reached the broker)."""
        return not self._outbox

    @property
    def pending(self) -> bool:
        """Something waits for the next round: a report, or an answer the broker refused."""
        return bool(self._outbox) or bool(self._replies)

    def spawned(self, c: Child, pid: int) -> None:
        """``c`` runs as ``pid``, its ``init`` returned: to the leader (with the watcher's next round)."""
        self._outbox.append(Spawned(c.name, c.key, self.hostname, c.sid, pid).to_wire())

    def exited(self, c: Child, pid: int, reason: str, code: int | None, stoppers: list[list[str]],
               handing: Handing | None = None) -> None:
        """``c`` (``pid``) ended: to the leader, which answers ``stoppers`` once the key is free; a
        process that handed off (``handing``) with its state, which the leader places elsewhere."""
        if handing is None:
            msg = Exited(c.name, c.key, self.hostname, pid, stoppers, c.sid, reason, code)
        else:
            msg = Exited(c.name, c.key, self.hostname, pid, stoppers, c.sid, reason, code, c.state, handing.to,
                         handing.since, c.args)
            c.state = None
        self._outbox.append(msg.to_wire())

    def not_there(self, name: str, key: str, stopper: list[str]) -> None:
        """A stop found no process: the leader answers ``stopper`` once its table has caught up
        (same queue, in order)."""
        self._outbox.append(Exited(name, key, self.hostname, None, [stopper]).to_wire())

    def spawn_failed(self, name: str, key: str, sid: str, error: str, **fields: str) -> None:
        """Tell the leader that the start ordered as ``sid`` did not happen (retried until the
        broker takes it). ``unavailable`` has the key placed elsewhere."""
        self._outbox.append(SpawnFailed(name, key, self.hostname, sid, error, fields.get("type"),
                                        fields.get("msg")).to_wire())
        self._wake()

    def reply(self, reply_to: str, msg: dict[str, Any]) -> None:
        """An answer to a caller (published with the watcher's next round). One to a queue no
        broker routes to is dropped here: its refusal would cost the answers published with it."""
        if type(reply_to) is not str or len(reply_to.encode("utf-8", "surrogatepass")) > _ROUTING_KEY:
            logger.warning("forseti: dropped an answer to %.80r: no queue has that name", reply_to)
            return
        with self._lock:
            self._replies.setdefault(reply_to, []).append(msg)

    def answer_started(self, c: Child, waiters: list[list[str]]) -> None:
        """Tell ``waiters`` that ``c`` runs: its worker and pid."""
        for reply_to, corr in waiters:
            self.reply(reply_to, Reply.ok(corr, [self.hostname, c.pid]).to_wire())

    def flush(self) -> None:
        """Publish what waits, reports first, in one go (on Redis, one round trip); everything is
        kept for the next round when the broker is unavailable. Watcher thread only."""
        batch = list(self._outbox)
        with self._lock:
            replies, self._replies = self._replies, {}
        if not batch and not replies:
            return
        try:
            self._publish(([(self._leader_rk, batch)] if batch else []) + _bodies(replies))
        except BrokerUnavailable:
            with self._lock:  # all kept: retried on the next round
                for rk, msgs in replies.items():
                    self._replies[rk] = msgs + self._replies.get(rk, [])
            return
        for _ in batch:
            self._outbox.popleft()
