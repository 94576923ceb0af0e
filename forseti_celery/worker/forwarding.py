"""Key-addressed messages on their way to a key's next incarnation: held, redirected, never dropped.

A key-addressed ``cast`` or ``call`` (``forseti_celery.send``/``call``: the optional ``ka``,
``a``, ``q`` fields of :class:`~forseti_celery.core.messages.Cast`) that reaches this worker
after its process has gone (passivated, exited, crashed before taking it, never here) is held
here, per ``(name, key)`` in arrival order, while the node finds the key's next incarnation; so
is one its process never took before it exited (left in its worker-side mailbox, see
:mod:`~forseti_celery.worker.pool.outbox`), given back by the pool once it is reaped
(:meth:`~forseti_celery.worker.pool.children.Children.untaken`), ahead of any held since:

1. a live or starting process of the key on this worker takes the held messages at once;
2. else, while the old process is still on its way out (passivating, stopping), the node waits
   for its reap (:meth:`~forseti_celery.worker.pool.children.Children.on_exit`: answered after
   its exit report, so the leader has freed the key before it is asked);
3. then it asks the leader with a plain ``get`` (the held messages' args, answered on this
   node's own queue, with a correlation id of its own), which starts the key on the least-used
   worker if it is down (created on demand, as ``get_key``).

The held messages then go to that ref, in order, readdressed to its pid and still key-addressed
(a call keeps its caller: the new process answers it directly), and the node remembers the
redirect old pid -> new ref for :data:`REDIRECT_FOR` seconds, so that later arrivals for the old
pid follow the same way, behind the held ones. Last, each sender is told with a ``moved``
notice (:class:`~forseti_celery.core.messages.Moved`, to its reply queue) the highest of its
sequence numbers forwarded: its client sends to the new ref directly only once that covers all
it sent on the old route, so this worker is the single funnel while it matters and nothing
overtakes. The client answers each notice with ``followed``
(:class:`~forseti_celery.core.messages.Followed`) once its route no longer leads to the old
process; until then the sender is *following* (:attr:`Forwarding.following`): it may still send
here, and a leaving worker keeps forwarding for it (:mod:`~forseti_celery.worker.leaving`). A
message written to a process's pipe counts as taken: it is never replayed.

Owner: the node's consumer thread (every field here); the pool's table is read through
:class:`~forseti_celery.worker.pool.children.Children`. A leaving worker's main thread reads
:attr:`Forwarding.arrived`, :attr:`Forwarding.holding` and :attr:`Forwarding.following`
(:mod:`~forseti_celery.worker.leaving`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery.utils.log import get_logger

from ..core import protocol as p
from ..core.messages import (
    ARGS,
    CALL,
    CORR,
    KEY_ADDRESSED,
    PAYLOAD,
    PID,
    REPLY_TO,
    SEQ,
    TYPE,
    Followed,
    Get,
    Moved,
    Reply,
)

if TYPE_CHECKING:
    from .pool.children import Children
    from .sending import Sender

logger = get_logger(__name__)

__all__ = ["REDIRECT_FOR", "Forwarding"]

Key = tuple[str, str]
Message = dict[str, Any]
Batches = dict[Key, list[Message]]

#: Seconds a redirect old pid -> new ref is kept (a sender switches on the ``moved`` notice).
REDIRECT_FOR = 60.0
_ASK_AGAIN = 5.0  # seconds without an answer before the node asks again (a lost request, a failover)
_ASK_FOR = 30.0  # the deadline of the node's own ``get``, as a caller's
_TRIES = 30  # answers naming a process already gone here, in a row, before the held messages fail
#: Seconds before asking again after such an answer (doubling, at most 1 s: ~25 s in all): a leader
#: rebuilding its table answers from the registries while the exit report it defers is on its way.
_STALE_FIRST, _STALE_MAX = 0.05, 1.0


@dataclass
class _Held:
    """The held messages of one key, in order, and what the node waits for to hand them over."""

    msgs: list[Message] = field(default_factory=list)
    corrs: set[str] = field(default_factory=set)  # the waits under way (exit or leader answer)
    asked_at: float = 0.0
    tries: int = 0


class Forwarding:
    """One worker's held key-addressed messages and redirects (consumer thread only)."""

    def __init__(self, hostname: str, children: Children, sender: Sender) -> None:
        self.hostname = hostname
        self._children = children
        self._reply_rk = sender.names.node_routing_key(hostname)  # where the leader and the pool answer us
        self._leader_rk = sender.names.leader
        self._to_queue = sender.to_queue
        self._to_node = sender.to_node
        self._flush = sender.flush
        self._held: dict[Key, _Held] = {}
        self._asked: dict[str, Key] = {}  # our correlation id -> the key it is for
        #: ``(name, key, old pid)`` -> ``(node, pid, until)``: where later arrivals for it go.
        self._redirects: dict[tuple[str, str, int], tuple[str, int, float]] = {}
        #: ``moved`` notices due once this batch's forwarded messages are out.
        self._moved: dict[tuple[str, str, str, int], tuple[str, int, int]] = {}
        #: ``(name, key, reply_to, old pid)`` of the senders told of a move that have not answered
        #: ``followed`` yet -> until when (monotonic) they are waited for (as long as the redirect).
        self._following: dict[tuple[str, str, str, int], float] = {}
        self._expire_at = 0.0
        #: When (monotonic) the node last had messages for its keyed processes: a leaving worker
        #: says ``bye`` once they stop coming (read by its main thread, a float swapped whole).
        self.arrived = 0.0

    @property
    def holding(self) -> int:
        """How many keys have messages held (any thread: the length of a dict)."""
        return len(self._held)

    @property
    def following(self) -> int:
        """How many senders told of a move may still send to the old process here: no ``followed``
        from them yet (any thread: the length of a dict)."""
        return len(self._following)

    def followed(self, msg: Message) -> None:
        """A sender's ``followed``: it sends nothing more to the old process (see :class:`Followed`)."""
        f = Followed.from_wire(msg)
        self._following.pop((f.name, f.key, f.reply_to, f.pid), None)

    # -- the node's deliveries -----------------------------------------------------------------
    def route(self, batches: Batches) -> Batches:
        """What of ``batches`` the pool is to deliver now: a key-addressed message for a key with
        held messages waits behind them; one for an old pid follows its redirect."""
        self.arrived = time.monotonic()
        self._resume()
        if not self._held and not self._redirects:
            return batches
        now = time.monotonic()
        out: Batches = {}
        for k, msgs in batches.items():
            held = self._held.get(k)
            for m in msgs:
                if not m.get(KEY_ADDRESSED):
                    out.setdefault(k, []).append(m)
                elif held is not None:
                    held.msgs.append(m)
                else:
                    to = self._redirected(k, m, now)
                    if to is not None:
                        out.setdefault(k, []).append(to)
                    held = self._held.get(k)  # (created by the redirect, maybe: later ones wait behind)
        return out

    def _redirected(self, k: Key, m: Message, now: float) -> Message | None:
        """``m`` itself, readdressed to where its pid's redirect points if it is here; None if it
        was sent on (to another worker) or held."""
        old = m.get(PID)
        at = (k[0], k[1], old if type(old) is int else -1)
        target = self._redirects.get(at)
        if target is None:
            return m
        node, pid, until = target
        if until < now:
            del self._redirects[at]
            return m
        if node != self.hostname:
            self._to_node(node, _readdressed(m, pid))
            self._note_moved(k, m, node, pid)
            return None
        live = self._children.incarnation(*k)
        if live is not None and live[0] == pid:
            self._note_moved(k, m, node, pid)
            return _readdressed(m, pid)
        self._hold({k: [m]})  # that one has gone too: the next incarnation
        return None

    def hold(self, held: Batches) -> None:
        """Key-addressed messages whose process is not live here (returned by the pool's
        delivery): held, in order, while the key's next incarnation is found."""
        self._resume()
        self._hold(held)

    def _resume(self) -> None:
        """Hold what reaped processes never took ahead of what is held for their keys since (it
        came first): the pool gives it back once it has reaped them."""
        for k, msgs in self._children.untaken().items():
            h = self._held.get(k)
            if h is None:
                self._hold({k: msgs})
            else:
                h.msgs[:0] = msgs

    def _hold(self, held: Batches) -> None:
        for k, msgs in held.items():
            h = self._held.get(k)
            if h is None:
                h = self._held[k] = _Held()
                h.msgs.extend(msgs)
                self._advance(k, h)
            else:
                h.msgs.extend(msgs)

    def sent(self) -> None:
        """After a batch: publish what was forwarded, then the ``moved`` notices (never before
        the messages they cover)."""
        if not self._moved:
            return
        self._flush()
        moved, self._moved = self._moved, {}
        until = time.monotonic() + REDIRECT_FOR
        for at, (node, pid, seq) in moved.items():
            name, key, reply_to, old = at
            self._to_queue(reply_to, Moved(name, key, self.hostname, old, node, pid, seq).to_wire())
            self._following[at] = until

    # -- finding the next incarnation ----------------------------------------------------------
    def _advance(self, k: Key, h: _Held) -> None:
        """Hand the held messages of ``k`` over now if a process of the key takes messages here;
        else wait for the old one's reap, or ask the leader."""
        live = self._children.incarnation(*k)
        if live is not None:
            self._hand_over(k, self.hostname, live[0])
            return
        corr = uuid.uuid4().hex
        h.corrs.add(corr)
        h.asked_at = time.monotonic()
        self._asked[corr] = k
        if not self._children.on_exit(k[0], k[1], (self._reply_rk, corr)):
            self._ask_leader(k, h, corr)

    def _ask_leader(self, k: Key, h: _Held, corr: str) -> None:
        args = h.msgs[0].get(ARGS) if h.msgs else None
        get = Get(k[0], k[1], args if isinstance(args, list) else [], self._reply_rk, corr, time.time() + _ASK_FOR)
        self._to_queue(self._leader_rk, get.to_wire())

    def reply(self, msg: Message) -> None:
        """An answer on this node's queue: a reap it waited for, or the leader's (or the new
        process's worker's) ``[node, pid]`` for a key it holds messages for."""
        self._resume()  # the reap answered here gave back what it never took: before any hand-over
        corr = Reply.corr_of(msg)
        k = self._asked.pop(corr, None) if type(corr) is str else None
        h = self._held.get(k) if k is not None else None
        if k is None or h is None or corr not in h.corrs:
            return  # an answer to a wait given up (asked again meanwhile) or finished
        h.corrs.discard(corr)
        answer = Reply.from_wire(msg)
        if answer.error is not None:
            self._fail(k, h, answer)
        elif answer.value is None:  # the old process is reaped: the leader has its exit report
            h.corrs.add(corr)
            self._asked[corr] = k
            self._ask_leader(k, h, corr)
        elif isinstance(answer.value, list) and len(answer.value) == 2 and type(answer.value[1]) is int:
            node, pid = answer.value
            if node != self.hostname:
                self._hand_over(k, str(node), pid)
                return
            live = self._children.incarnation(*k)
            if live is not None and live[0] == pid:
                self._hand_over(k, node, pid)
            elif h.tries < _TRIES:  # a process of ours the leader has not seen leave yet: ask again soon
                h.tries += 1
                h.asked_at = time.monotonic() - _ASK_AGAIN + min(_STALE_FIRST * 2 ** min(h.tries, 5), _STALE_MAX)
            else:
                self._fail(k, h, Reply.fail(corr, "gone", f"keyed process {k[1]!r} ({k[0]}) keeps exiting"))

    def _hand_over(self, k: Key, node: str, pid: int) -> None:
        h = self._held.pop(k)
        logger.debug("forseti: %s hands %d held messages for %r (%s) to pid %d on %s", self.hostname, len(h.msgs),
                     k[1], k[0], pid, node)
        for corr in h.corrs:
            self._asked.pop(corr, None)
        until = time.monotonic() + REDIRECT_FOR
        for m in h.msgs:
            old = m.get(PID)
            if type(old) is int and old != pid:
                self._redirects[(k[0], k[1], old)] = (node, pid, until)
        if node != self.hostname:
            for m in h.msgs:
                self._to_node(node, _readdressed(m, pid))
                self._note_moved(k, m, node, pid)
            return
        msgs = [_readdressed(m, pid) for m in h.msgs]
        back = self._children.deliver({k: msgs}).get(k, [])
        again = []
        for m, orig in zip(msgs, h.msgs, strict=True):
            if any(m is b for b in back):
                again.append(orig)
            else:
                self._note_moved(k, orig, node, pid)
        if again:  # gone between the look and the write: the next one, then
            self._hold({k: again})

    def _note_moved(self, k: Key, m: Message, node: str, pid: int) -> None:
        reply_to, seq, old = m.get(REPLY_TO), m.get(SEQ), m.get(PID)
        if type(reply_to) is not str or type(seq) is not int or type(old) is not int:
            return  # a sender that hears no notices
        at = (k[0], k[1], reply_to, old)
        known = self._moved.get(at)
        self._moved[at] = (node, pid, seq if known is None else max(seq, known[2]))

    def _fail(self, k: Key, h: _Held, answer: Reply) -> None:
        """No next incarnation (its start failed, no eligible worker, ...): each held call is
        answered with the error; the held casts are dropped, and logged."""
        del self._held[k]
        for corr in h.corrs:
            self._asked.pop(corr, None)
        casts = 0
        for m in h.msgs:
            if m.get(TYPE) == CALL and type(m.get(REPLY_TO)) is str:
                self._to_queue(m[REPLY_TO], Reply.fail(m[CORR], answer.error or "gone", answer.text or "",
                                                       answer.exc_type).to_wire())
            else:
                casts += 1
        if casts:
            logger.warning("forseti: %s dropped %d key-addressed casts to %r (%s): no next incarnation (%s: %s)",
                           self.hostname, casts, k[1], k[0], answer.error, answer.text)

    # -- the node's clock ----------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Ask again for keys whose answer is overdue (then send what that sent, see :meth:`sent`);
        forget expired redirects and senders that never answered (once a second)."""
        self._resume()
        for k, h in list(self._held.items()):
            if now - h.asked_at >= _ASK_AGAIN:
                self._advance(k, h)
        self.sent()
        if (self._redirects or self._following) and now >= self._expire_at:
            self._expire_at = now + 1.0
            for old, (_, _, until) in list(self._redirects.items()):
                if until < now:
                    del self._redirects[old]
            for at, until in list(self._following.items()):
                if until < now:  # a client gone, or one older than ``followed``
                    del self._following[at]


def _readdressed(m: Message, pid: int) -> Message:
    """``m`` for process ``pid``: its envelope written anew, its payload's bytes as they came."""
    if m.get(PID) == pid:
        return m
    env = {f: v for f, v in m.items() if f != PAYLOAD}
    env[PID] = pid
    raw = m.get(PAYLOAD)
    if not isinstance(raw, p.Raw):
        return env
    head = p.encode([env])
    line = head + b"\t" + bytes(raw.line[raw.at:])
    env[PAYLOAD] = p.Raw(line, len(head) + 1)
    return env
