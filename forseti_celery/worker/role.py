"""A worker's hold on the leader role: the epoch below which it refuses orders (only ever raised by
the election or by the leader queue's active consumer), taking the role (Redis: the lease;
RabbitMQ: a leader message delivered to us), leaving it (lease or connection lost, a newer leader
heard) and handing it over when the worker stops.

Threads: ``epoch`` and the :class:`~forseti_celery.worker.leader.Leader` belong to the
``forseti-node`` consumer thread, which calls every method here; the worker's main thread calls
:meth:`Role.hand_over` only once that thread is gone, and waits on ``handed_over`` otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from celery.utils.log import get_logger

from ..core import protocol as p
from ..core.consumer import ConsumerLoop
from .election import Election
from .events import EventSender
from .leader import Leader

logger = get_logger(__name__)

__all__ = ["Role"]


class Role:
    """Whether this worker leads, and the newest leader epoch it has proof of."""

    def __init__(self, hostname: str, leader: Leader, election: Election, events: EventSender,
                 queue: Any, on_step_down: Callable[[], None]) -> None:
        self.hostname = hostname
        self.leader = leader
        self.election = election
        self.events = events
        self.queue = queue  # the leader queue (a kombu Queue)
        self.loop: ConsumerLoop | None = None  # set once the node has built its consumer loop
        self.epoch = 0  # highest leader epoch seen: orders from older leaders are refused
        self.handed_over = threading.Event()  # closing: the role is left and the lease released
        self._on_step_down = on_step_down

    def take(self) -> None:
        """RabbitMQ: a leader message came to us, the leader queue's single active consumer."""
        self.leader.activate(self.epoch)
        self.events.send(p.EVENT_LEADER, leader=self.hostname)

    def backed(self, epoch: int, leader: str) -> bool | None:
        """Whether the election granted ``leader`` the term ``epoch`` (Redis: its holder key, read
        now); None when that cannot be read here (RabbitMQ: see :meth:`leads`). The epoch below
        which this worker refuses orders comes only from the election: a message claiming another
        one (forged, or from a confused worker) neither deposes the leader nor makes this worker
        refuse the real one's orders. On Redis the holder key is the truth, also when it went back
        (a Redis that lost its data: every lease went with it, so no older leader leads either)."""
        held = self.election.holder()
        if held is None:
            return None
        if held[0]:
            self.epoch = held[0]
        return held == (epoch, leader)

    def leads(self, msg: dict[str, Any]) -> None:
        """RabbitMQ: the answer to one of our latest pings, which only the leader queue's active
        consumer heard (the caller checked its nonce): the epoch to hold, and whether we still lead."""
        self.epoch = max(self.epoch, int(msg["epoch"]))
        if self.leader.active and msg["leader"] != self.hostname:
            logger.warning("forseti: %s answers the leader queue (epoch %s); stepping down",
                           msg["leader"], msg["epoch"])
            self.step_down()

    def heard_leader(self, hb: dict[str, Any]) -> None:
        """Another worker's heartbeat says it leads: with a newer epoch the election backs, step down.
        Every worker keeps what the leader's says its own worker runs (see ``Restarts.orphans``)."""
        self.leader.restarts.heard(hb["node"], bool(hb.get("leader")) and hb["node"] != self.hostname,
                                   hb.get("keep"))
        epoch = int(hb.get("epoch", 0))
        if hb.get("leader") and hb["node"] != self.hostname and epoch > max(self.epoch, self.leader.epoch):
            if self.backed(epoch, hb["node"]) and self.leader.active and epoch > self.leader.epoch:
                logger.warning("forseti: %s leads with a newer epoch (%d); stepping down", hb["node"], epoch)
                self.step_down()

    def lease(self, held: bool, closing: bool) -> None:
        """Redis: the election's answer at this tick (``held``: we hold the lease)."""
        if held and not self.leader.active and not closing:
            token = self.election.token
            self.epoch = self.epoch if token is None else token
            self.leader.activate(self.epoch, token)
            if self.loop is not None:
                self.loop.add_queue(self.queue)
            self.events.send(p.EVENT_LEADER, leader=self.hostname)
        elif not held and self.leader.active:
            self.step_down()

    def hand_over(self) -> None:
        """Closing: leave the role, and only then let a successor take it (a standby at once, not
        when the lease runs out). On the consumer thread, between two batches, so this worker acts
        on no leader message once another may lead."""
        if self.leader.active:
            self.step_down()
        if self.loop is not None:
            self.loop.cancel_queue(self.queue)  # RabbitMQ: the broker picks another consumer now
        self.election.release()
        self.handed_over.set()

    def step_down(self) -> None:
        """Leave the role (lease lost, connection lost, or a newer leader heard): messages held for
        it go back to the leader queue."""
        if not self.election.always_consume and self.loop is not None:
            self.loop.cancel_queue(self.queue)
        self.leader.deactivate()
        self._on_step_down()
