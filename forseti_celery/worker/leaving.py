"""A worker's way out (warm shutdown, or cold with 1 s of grace), once it has handed the leader
role over: its movable keyed processes handed off, the others stopped, and the key-addressed
messages that still reach its queue handed to their keys' next incarnations before it says ``bye``.

1. On a warm shutdown every movable keyed process hands off (:mod:`~.handoff`: its state goes to
   its key's next incarnation on another worker, which the leader starts once its exit report has
   come), within forseti_handoff_timeout. Every other keyed process is stopped meanwhile (reason
   ``shutdown``, ``terminate`` runs within the grace), and the node waits until all their exit
   reports have reached the broker: the leader frees each key before any next incarnation can
   start, so a key never has two processes.
2. The node goes on consuming its own queue. A key-addressed message that reaches it now (a
   client that has not moved its route yet) is held and forwarded by
   :class:`~.forwarding.Forwarding` to the key's next incarnation, which the leader starts on
   another worker (this one is closing: not eligible, and it refuses spawns as
   ``unavailable``); its sender gets a ``moved`` notice and moves its route once the notice
   covers all it sent here, which it answers with ``followed``. The node waits until nothing is
   held, every sender told of a move has answered (:attr:`Forwarding.following
   <.forwarding.Forwarding.following>`: a streaming sender whose notice did not cover its latest
   message yet, or that has not read it yet, still sends here, however long its process or the
   broker stalls) and nothing has arrived for :func:`quiet_for` seconds, at most until the grace
   (counted from here) runs out.
3. ``bye``: the leader drops this worker at once and tells the clients (``forseti-node-lost``);
   its heartbeats stop, so a member that said ``bye`` is never heard again.
4. The node forwards what arrives for :func:`quiet_for` seconds more, and until nothing is held
   and every sender told of a move has answered (within the grace): messages clients sent
   before they heard that this worker left.

Then the node stops its consumer. What is still held past the grace is lost, and logged.

Threads: :func:`leave` runs in the worker's main thread (the bootstep's ``stop``) while the
``forseti-node`` consumer thread goes on handling what arrives; they share only what
:attr:`Forwarding.arrived <.forwarding.Forwarding.arrived>`,
:attr:`Forwarding.holding <.forwarding.Forwarding.holding>` and
:attr:`Forwarding.following <.forwarding.Forwarding.following>` say (written there, read here) and
:attr:`Liveness.left <.liveness.Liveness.left>` (set here, once).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from celery.utils.log import get_logger

if TYPE_CHECKING:
    from .forwarding import Forwarding
    from .liveness import Liveness
    from .pool.children import Children

logger = get_logger(__name__)

__all__ = ["leave", "quiet_for"]

_POLL = 0.02  # seconds between two looks at the consumer thread's forwarding


def quiet_for(heartbeat: float) -> float:
    """Seconds without a key-addressed arrival after which a leaving worker takes its clients to
    have moved: half a heartbeat (the cluster's latency scale), between 0.1 s and 1 s."""
    return min(1.0, max(0.1, heartbeat / 2))


def leave(hostname: str, children: Children, forwarding: Forwarding, liveness: Liveness,
          bye: Callable[[], None], grace: float, quiet: float, hand_off: Callable[[], float] | None = None) -> None:
    """Hand movable keyed processes off (``hand_off``: returns the handoffs' deadline), stop the
    others, forward what still arrives, say ``bye`` (see the module's steps); the caller stops the
    consumer thread after."""
    until = hand_off() + grace if hand_off is not None else 0.0  # (a late snapshot's process is killed then)
    if not children.stop_all("shutdown", grace, until):
        logger.warning("forseti: %s stopped before every exit reached the broker", hostname)
    deadline = time.monotonic() + grace
    _drain(forwarding, 0.0, quiet, deadline)  # no wait when nothing has arrived lately
    # Only now, with every process gone and the clients moved: the leader frees what is left of ours at once.
    bye()
    liveness.left = True
    if not _drain(forwarding, time.monotonic(), quiet, max(deadline, time.monotonic() + quiet)):
        logger.warning("forseti: %s left with key-addressed messages held for %d keys: lost", hostname,
                       forwarding.holding)
    if forwarding.following:
        logger.warning("forseti: %s left before %d senders told of a move answered: what they still send here is "
                       "lost", hostname, forwarding.following)


def _drain(forwarding: Forwarding, since: float, quiet: float, deadline: float) -> bool:
    """Wait until nothing is held, every sender told of a move has followed it, and nothing
    arrived for ``quiet`` seconds (counted from ``since`` at the earliest), or until ``deadline``;
    whether nothing is held."""
    while True:
        now = time.monotonic()
        held = forwarding.holding
        if not held and not forwarding.following and now - max(since, forwarding.arrived) >= quiet:
            return True
        if now >= deadline:
            return not held
        time.sleep(_POLL)
