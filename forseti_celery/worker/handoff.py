"""Handoff, the worker's side: a movable keyed process's state carried to its key's next
incarnation on another worker, on a warm shutdown (:meth:`Handoffs.leaving`) or on the leader's
order (a ``move``, rebalancing: :meth:`Handoffs.move`). See ``docs/state.rst``.

1. The worker writes ``handoff`` into the process's mailbox, after what it has already
   (:meth:`Children.hand_off <.pool.children.Children.hand_off>`). From then on the process takes
   no key-addressed message: the node holds them (:mod:`.forwarding`), in arrival order.
2. The process handles what came before, takes ``snapshot()``, answers ``handed_off`` with it,
   runs ``terminate("handoff")`` and exits. Its state is kept as the JSON bytes it came as: no
   thread of the worker decodes it (a 5 MB snapshot costs the watcher a copy, no parse).
3. Its exit report (:class:`~forseti_celery.core.worker_messages.Exited`, reason ``handoff``)
   carries the state to the leader, which only then orders the key's start on the target (the
   ``move``'s, or the least-used eligible worker: a leaving worker is none), the state in its
   ``Spawn``: the old process's exit has reached the leader before the new one is ordered, so
   a key never has two live processes.
4. The node's held messages go to the new process once the leader names it, in order, with
   everything that still arrives for the old one (:mod:`.forwarding`); a leaving worker says
   ``bye`` only after that (:mod:`.leaving`).

A snapshot that raises (``handoff_failed``) or comes after the handoff's deadline
(forseti_handoff_timeout from its start) ends the process as a shutdown ends it: its exit reason
``shutdown``, its state dropped (and logged); it is killed if still alive forseti_stop_timeout
after the deadline.

A worker that led hands off only once another leads, ready (its heartbeat says so; at most a
third of the bound is spent waiting): the exit reports then reach a leader whose table has the
keys, never one rebuilding its table while clients, told of the new leader, ask for the keys
again (the exit reports the old leader had taken are put back behind their requests, and a
request for a key missing from the table would start it afresh, without its state).

Threads: :meth:`Handoffs.leaving` runs in the worker's main thread (the bootstep's stop; it reads
the heartbeats the consumer thread records, as hints), :meth:`Handoffs.move` in the node's
consumer thread; both only write to mailboxes under the pool's lock, never wait on a pipe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.utils.log import get_logger

from ..core.process import is_movable
from ..core.worker_messages import Move
from .pool.children import Children
from .pool.table import Handing, Start
from .rebalance import Rebalancer

if TYPE_CHECKING:
    from .role import Role

logger = get_logger(__name__)

__all__ = ["Handoffs", "start_of"]


class Handoffs:
    """One worker's handoffs: which of its processes can move, and starting them."""

    def __init__(self, hostname: str, children: Children, resolve: Callable[[str], Any], timeout: float,
                 role: Role) -> None:
        self.hostname = hostname
        self._children = children
        self._resolve = resolve
        self.timeout = timeout
        self._role = role

    def movable(self, name: str) -> bool:
        """Whether the processes of ``name`` can hand off (their class defines ``snapshot``)."""
        try:
            return is_movable(self._resolve(name))
        except Exception:  # an unknown name, a broken registration: it stays where it is
            return False

    def rebalancer(self, mode: str, batch: int) -> Rebalancer:
        """The leader's rebalancing (``forseti_rebalance``, ``forseti_rebalance_batch``), which moves
        the names this worker knows as movable."""
        return Rebalancer(mode, batch, self.timeout, self.movable)

    def leaving(self) -> float:
        """A warm shutdown begins: every started movable process hands off (to wherever the
        leader places it). Returns the handoffs' deadline (``time.monotonic()``; now if none)."""
        now = time.monotonic()
        deadline = now + self.timeout
        movable = [c for c in self._children.snapshot() if c.started and self.movable(c.name)]
        if not movable:
            return now
        self._await_leader(now + self.timeout / 3)
        handing = Handing(None, time.time(), deadline)
        count = sum(self._children.hand_off(c.name, c.key, c.pid, handing)
                    for c in movable)
        if not count:
            return now
        logger.info("forseti: %s hands %d keyed processes off (forseti_handoff_timeout %g s)", self.hostname, count,
                    self.timeout)
        return deadline

    def _await_leader(self, until: float) -> None:
        """Wait until another worker leads, ready, or until ``until`` (see the module's docstring)."""
        members = self._role.leader.members
        while time.monotonic() < until and not any(m.leader and m.hostname != self.hostname for m in members):
            time.sleep(0.02)

    def move(self, msg: dict[str, Any]) -> None:
        """The leader's ``move``: hand one process off to the worker it names (consumer thread)."""
        o = Move.from_wire(msg)
        if o.epoch < self._role.epoch:
            logger.warning("forseti: %s refused a move of %r from deposed leader %s (epoch %d)", self.hostname, o.key,
                           o.leader, o.epoch)
            return
        if not self.movable(o.name) or not self._children.hand_off(
                o.name, o.key, o.pid, Handing(o.to, time.time(), time.monotonic() + self.timeout)):
            logger.info("forseti: %s did not move %r (%s, pid %d): not here, not movable, or stopping",
                        self.hostname, o.key, o.name, o.pid)


def start_of(epoch: int, state: bytes | None, source: str | None, since: float | None) -> Start:
    """What a ``Spawn`` gives its process's start besides its args (see :class:`~.pool.table.Start`)."""
    return Start(epoch, state, source, since if since is not None or source is None else time.time())
