"""A worker's node: the ``forseti-node`` consumer thread that gives every worker its keyed
processes, and the dispatcher of what it consumes (a table of handlers, one per message kind).

Each worker runs one :class:`Node` (started by the bootstep, :mod:`~forseti_celery.worker.step`): a
consumer thread with its own broker connection (its queue, the heartbeat fanout and, when it leads,
the leader queue) beside the :class:`~forseti_celery.worker.pool.children.Children` pool, apart from
Celery's consumer: children outlive its restarts, and a task blocked in ``get_key`` (solo pool)
stalls no leader. Each concern is a collaborator's module: :class:`~.liveness.Liveness` (heartbeats,
stalls, fencing), :class:`~.role.Role` (the leader role), :class:`~.sending.Sender` (sends),
:class:`~.forwarding.Forwarding` (messages whose process has gone), :class:`~.handoff.Handoffs`.

Threads: every field is the consumer thread's (``_held``, ``_local``, the leader's table), but
``_closing``, set once by the worker's main thread in :meth:`Node.stop`. What the node addresses to
itself (the leader's orders to its own worker, the report it asks of it) waits in ``_local`` and is
handled after the message that sent it, never inside it.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.platforms import EX_FAILURE
from celery.utils.log import get_logger
from celery.worker import state as worker_state

from ..core import protocol as p
from ..core import transport
from ..core.broker import RestartIntensity
from ..core.conf import ChildConfig
from ..core.consumer import ConsumerLoop
from ..core.errors import BrokerUnavailable, DuplicateWorker
from ..core.messages import KEY, NAME, TYPE
from ..core.signing import signer_for
from ..core.worker_messages import Bye, Heartbeat, Leads, Ping, Report, Spawn
from .election import election_for
from .events import EventSender
from .forwarding import Forwarding
from .handoff import Handoffs, start_of
from .leader import Leader
from .leaving import leave, quiet_for
from .liveness import Liveness, check_alone
from .membership import Members
from .pool.children import Children
from .restarts import keep, policy_of
from .role import Role
from .sending import Sender

if TYPE_CHECKING:
    from ..core.installs import Installed

logger = get_logger(__name__)

__all__ = ["SUPPORTED_TRANSPORTS", "Node"]

#: Transports with what the leader election needs (single active consumer, or Redis for the lease).
SUPPORTED_TRANSPORTS = transport.SUPPORTED
_LEADER_TYPES = frozenset({p.GET, p.SEARCH, p.METRICS, p.STOP_KEY, p.SPAWNED, p.SPAWN_FAILED, p.EXITED, p.PING})
_TO_CHILD = frozenset({p.CAST, p.CALL, p.STOP})
#: Held, not handled, while a worker is not sure it still holds the leader role (see ``Liveness.stalled``).
_HELD_TYPES = _LEADER_TYPES | {p.REPORT, p.BYE}
_LOST = "lost"  # internal: a worker died while the role was in doubt, replayed once it is not
Message = dict[str, Any]


class Node:
    """One worker's share of the cluster: its keyed processes, and the leader role when it holds it."""

    def __init__(self, forseti: Installed, hostname: str) -> None:
        app = forseti.app
        self.forseti = forseti
        self.hostname = hostname
        self.settings = s = forseti.settings
        driver = transport.require(app.connection_for_write()).name
        self.names = forseti.names
        self.incarnation = uuid.uuid4().hex
        self.eligible = not s.nodes or hostname in s.nodes
        self.members = Members(s.node_timeout)
        self.events = EventSender(app, hostname, s.namespace)
        # Worker secret set: everything we publish is signed, and worker messages we receive are
        # believed only signed (a message older than a worker's timeout says nothing true any more).
        self.signer = signer_for(s.worker_secret, hostname, s.node_timeout)
        self.sender = Sender(app.connection_for_write(), self.names, self.signer)
        self.publisher = self.sender.publisher  # remote control publishes a stop with it
        self.election = election_for(driver, app.connection_for_write(), f"{s.namespace}:leader", s.lease, hostname)
        self.leader = Leader(hostname, self.members, self._send_node, self.sender.to_queue, policy_of(forseti),
                             self.events.send)
        self.children = Children(hostname, forseti.resolve, self.sender.publish_many, self.names.leader,
                                 self.events.send, ChildConfig.from_settings(s),
                                 lambda name: forseti.policy(name).idle_timeout, forseti.known_names)
        self.forwarding = Forwarding(hostname, self.children, self.sender)
        self.liveness = Liveness(hostname, s, self.members, self.children)
        self.role = Role(hostname, self.leader, self.election, self.events, self.names.leader_queue, self._forward_held)
        self.handoffs = Handoffs(hostname, self.children, forseti.resolve, s.handoff_timeout, self.role)
        self.leader.rebalancer = self.handoffs.rebalancer(s.rebalance, s.rebalance_batch)
        self._node_queue = self.names.node_queue(hostname)
        self._closing = False
        self._held: list[Message] = []  # while in doubt (see Liveness.stalled), in order
        self._local: deque[Message] = deque()  # what we addressed to ourselves, not handled yet
        self._settling = False
        self._handlers: dict[str, Callable[[Message], None]] = {
            **{kind: self._for_leader for kind in _LEADER_TYPES},
            _LOST: lambda msg: self._lost(msg["node"]), p.HEARTBEAT: self._heard, p.BYE: self._bye,
            p.LEADS: self._leads, p.SPAWN: self._spawn, p.REPORT_REQUEST: self._report, p.REPORT: self.leader.report,
            p.REPLY: self.forwarding.reply, p.MOVE: self.handoffs.move, p.FOLLOWED: self.forwarding.followed,
        }
        self.loop = self.role.loop = ConsumerLoop(
            # The broker's heartbeat ends a hung leader's connection, so a standby takes over.
            "forseti-node", lambda: app.connection_for_read(heartbeat=s.lease),
            lambda: [self._node_queue, self.names.bcast_queue(hostname, self.incarnation)]
            + ([self.names.leader_queue] if self.election.always_consume and not self._closing else []),
            self._on_batch,
            intensity=RestartIntensity(s.max_retries, s.max_time),
            tick=self._tick, interval=min(0.25, s.heartbeat / 2),
            on_connect=self._connected, on_disconnect=self._disconnected, on_give_up=self._give_up,
            admit=self._admit,
            # A flood to our keys waits in the broker, not ahead of the heartbeats and leader requests.
            windowed=lambda: [self._node_queue],
        )

    @property
    def epoch(self) -> int:
        """The highest leader epoch this worker has proof of: orders from older leaders are refused."""
        return self.role.epoch

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Make sure no live worker has our name (:class:`DuplicateWorker`), then start the threads."""
        try:
            check_alone(self.forseti.app, self.names, self.hostname, self.incarnation, self.signer,
                        2 * self.settings.heartbeat)
        except DuplicateWorker:
            self.events.close()
            self.sender.close()
            self.election.close()
            raise
        self.children.start()
        self.loop.start()
        logger.info("forseti: registry of %s started (eligible: %s)", self.hostname, self.eligible)

    def stop(self, grace: float | None = None) -> None:
        """Warm shutdown (``grace`` None; cold: no handoffs), as :func:`~.leaving.leave` says."""
        self._closing = True
        self._await_handover()
        leave(self.hostname, self.children, self.forwarding, self.liveness, lambda: self.sender.broadcast(
            Bye(self.hostname, self.incarnation).to_wire()), self.settings.stop_timeout if grace is None else grace,
              quiet_for(self.settings.heartbeat), self.handoffs.leaving if grace is None else None)
        self.loop.stop()
        self.children.stop()
        self.events.close()
        self.sender.close()
        self.election.close()

    def _give_up(self, exc: BaseException) -> None:
        """The consumer thread failed past its restart intensity: the worker stops (warm, exit code 1)."""
        logger.critical("forseti: stopping worker %s: its registry thread failed more than %d times in %g s "
                        "(forseti_max_retries, forseti_max_time); last: %r",
                        self.hostname, self.settings.max_retries, self.settings.max_time, exc)
        worker_state.should_stop = EX_FAILURE

    def _await_handover(self) -> None:
        """Wait until the consumer thread has left the role and released it (see :meth:`Role.hand_over`)."""
        if not self.loop.is_alive():
            self.role.hand_over()  # nothing else acts on leader messages
        elif not self.role.handed_over.wait(max(1.0, 2 * self.settings.heartbeat)):
            # Stuck in a batch: releasing from here would let a successor lead beside it.
            logger.warning("forseti: %s could not hand the leader role over; it passes when the lease runs out",
                           self.hostname)

    def _connected(self) -> None:
        self.liveness.next_beat = 0.0
        self.members.refresh()  # we heard nothing while away: give everyone a fresh timeout
        self._tick()

    def _disconnected(self) -> None:
        # A lost connection loses the single active consumer slot (and maybe the lease).
        self.role.step_down()
        self.sender.flush()

    # -- consumer thread: dispatch ------------------------------------------------------------
    def _admit(self, message: Any, batch: list[Message]) -> list[Message]:
        """What of ``batch`` (decoded from the kombu ``message``) to act on: what a worker secret's
        signature allows (:meth:`~forseti_celery.core.signing.Signer.admit`), and leader messages only
        from the leader queue (on RabbitMQ one makes its receiver take the role: a client's request
        written to a worker's own queue would make that worker lead beside the real leader)."""
        if self.signer is not None:
            batch = self.signer.admit(message, batch)
        info = message.delivery_info or {}
        if not info.get("exchange") and info.get("routing_key") == self.names.leader:
            return batch
        kept = [m for m in batch if m.get(TYPE) not in _LEADER_TYPES]
        if len(kept) != len(batch):
            logger.warning("forseti: %s dropped %d leader messages that did not come through the leader queue",
                           self.hostname, len(batch) - len(kept))
        return kept

    def _on_batch(self, batch: list[Message]) -> None:
        self.liveness.stalled(time.monotonic())
        self._handle(batch)
        self.forwarding.sent()
        self.sender.flush()

    def _handle(self, batch: list[Message]) -> None:
        """Handle a batch in order, each message on its own: a malformed one (forged, or from a broken
        client: clients may write to every queue) is logged and skipped, and costs none of the others."""
        to_children: dict[tuple[str, str], list[Message]] = {}
        for msg in batch:
            kind = msg.get(TYPE)
            if kind == _LOST or type(kind) is not str:  # _LOST: our own note, only ever held
                if kind != _LOST:
                    logger.warning("forseti: %s skipped a message of no type", self.hostname)
                continue
            if kind in _TO_CHILD:
                if type(msg.get(NAME)) is str and type(msg.get(KEY)) is str:
                    to_children.setdefault((msg[NAME], msg[KEY]), []).append(msg)
                else:
                    logger.warning("forseti: %s skipped a %r message naming no key", self.hostname, kind)
                continue
            if to_children:  # keep the order of everything else relative to deliveries
                self._deliver(to_children)
                to_children = {}
            self._dispatch_logged(kind, msg, "")
        if to_children:
            self._deliver(to_children)

    def _dispatch_logged(self, kind: str, msg: Message, what: str) -> None:
        """Dispatch one message (a malformed one is logged and skipped), then what it addressed to us."""
        try:
            self._dispatch(kind, msg)
        except BrokerUnavailable:
            raise
        except Exception:
            logger.exception("forseti: %s skipped a malformed %s%r message", self.hostname, what, kind)
        self._settle()

    def _settle(self) -> None:
        """Handle, in order, what we addressed to ourselves, each after the message that sent it: flat,
        here, not inside the leader's handler (which would run our dispatch, and maybe the leader again)."""
        if self._settling:
            return  # the loop below, further up this very stack, takes them
        self._settling = True
        try:
            while self._local:
                self._handle([self._local.popleft()])
        except BaseException:
            self._local.clear()  # lost with the batch, as they were when handled inside the sender
            raise
        finally:
            self._settling = False

    def _deliver(self, to_children: dict[tuple[str, str], list[Message]]) -> None:
        try:  # a key-addressed message whose process has gone is held for its next incarnation
            self.forwarding.hold(self.children.deliver(self.forwarding.route(to_children)))
        except Exception:
            logger.exception("forseti: %s could not deliver %d messages", self.hostname,
                             sum(map(len, to_children.values())))

    def _dispatch(self, kind: str, msg: Message) -> None:
        if self.liveness.doubt is not None and kind in _HELD_TYPES:
            self._held.append(msg)
            return
        handler = self._handlers.get(kind)
        if handler is not None:
            handler(msg)

    # -- consumer thread: handlers ------------------------------------------------------------
    def _for_leader(self, msg: Message) -> None:
        kind = msg[TYPE]
        if not self.leader.active:
            if self._closing or not self.election.always_consume:
                if kind != p.PING:
                    self.sender.forward([msg])  # popped as the role passed: for the new holder
                return
            self.role.take()
        if kind != p.PING:
            self.leader.handle(msg)
        elif self.leader.ready and "node" in msg:
            # Only the active consumer hears a ping: its answer tells the pinger who leads.
            self._send_node(msg["node"], Leads(self.hostname, self.leader.epoch, msg.get("nonce")).to_wire())

    def _bye(self, msg: Message) -> None:
        if msg["node"] != self.hostname and self.members.remove(msg["node"], str(msg.get("inc"))):
            self._lost(msg["node"])

    def _leads(self, msg: Message) -> None:
        if self.liveness.pinged(msg.get("nonce")):
            self.role.leads(msg)

    def _report(self, msg: Message) -> None:
        """A leader asks for our registry: the processes here, and their init args (``a``, parallel to ``procs``)."""
        if int(msg["epoch"]) != self.epoch:
            self.role.backed(int(msg["epoch"]), msg["leader"])
        procs, args, restarts = self.children.registry_report()
        self._send_node(msg["leader"], Report(self.hostname, self.epoch, procs, msg.get("q", 0), args,
                                              restarts).to_wire())

    def _spawn(self, msg: Message) -> None:
        epoch = int(msg["epoch"])
        if epoch != self.epoch and self.role.backed(epoch, str(msg.get("leader"))) is False:
            logger.warning("forseti: refused spawn of %r from %s: the election granted no epoch %d to it "
                           "(latest: %d)", msg[KEY], msg.get("leader"), epoch, self.epoch)
            return
        if epoch < self.epoch:
            logger.warning("forseti: refused spawn of %r from deposed leader %s (epoch %d < %d)",
                           msg[KEY], msg.get("leader"), epoch, self.epoch)
            return
        if not self._available():
            # Stopping, cut off, or not sure we are heard: the leader places it elsewhere.
            self.children.spawn_failed(msg[NAME], msg[KEY], msg["sid"], "unavailable")
            return
        o = Spawn.from_wire(msg)  # a restart is held for its back-off (after) by the pool; a handoff's state
        self.children.spawn(o.name, o.key, o.args, o.sid, o.waiters, o.hold, o.restart_count,
                            start_of(o.epoch, o.state, o.source, o.since))

    def _heard(self, hb: Message) -> None:
        ours = hb["node"] == self.hostname and hb["inc"] == self.incarnation
        recovered = self.liveness.echo(hb) if ours else False
        if self.members.heard(hb) is None:
            self.liveness.twin(hb)
            return
        if recovered:  # after recording the echo, a beat sent in doubt: _trust's own beat is the truth
            self._trust()
        self.role.heard_leader(hb)
        if self.liveness.doubt is None:
            self.leader.heartbeat(hb)

    def _trust(self) -> None:
        """Heard again after a stall: handle what was held (its leader messages go to whoever leads)."""
        self.liveness.trusted()  # say at once that we take keys again (beats sent in doubt said not)
        self._beat()
        held, self._held = self._held, []
        if held:
            logger.info("forseti: %s is heard again; handling %d held messages", self.hostname, len(held))
        for msg in held:
            self._dispatch_logged(msg[TYPE], msg, "held ")

    def _available(self) -> bool:
        """Whether this worker takes new keyed processes now."""
        return not self._closing and self.liveness.sure

    def _lost(self, hostname: str) -> None:
        """A worker died or left (or restarted): the leader frees its keys and tells clients."""
        if self.liveness.doubt is not None:
            self._held.append({TYPE: _LOST, "node": hostname})
        elif self.leader.active:
            self.leader.node_lost(hostname)
            self.events.send(p.EVENT_NODE_LOST, node=hostname)

    def _forward_held(self) -> None:
        """The role is left: messages held for it go back to the leader queue."""
        held, self._held = self._held, []
        self.sender.forward([m for m in held if m[TYPE] in _LEADER_TYPES and m[TYPE] != p.PING])

    # -- consumer thread: the clock -----------------------------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        self.liveness.stalled(now)
        connected = self.loop.connected.is_set()
        held = self.election.poll() if connected and not self._closing else False
        if held is not None:
            self.role.lease(held, self._closing)
            self._settle()  # a new leader's report request to ourselves: before anything else
        if self._closing and not self.role.handed_over.is_set():
            self.role.hand_over()
        if connected:  # silence heard while we cannot hear anything proves nothing
            for dead in self.members.expire(now):
                logger.info("forseti: worker %s is silent; declared dead", dead.hostname)
                self._lost(dead.hostname)
                self._settle()
        self.liveness.fence(now)
        if self.leader.ready:
            self.leader.expire()
        self.forwarding.tick(now)
        if connected and self.liveness.beat_due(now):
            self._beat()
        self._settle()
        self.sender.flush()

    def _beat(self) -> None:
        ready, procs = self.leader.ready, self.children.snapshot()
        hb = Heartbeat(self.hostname, self.incarnation, self.liveness.next_seq(), self.eligible and self._available(),
                       sorted(self.forseti.known_names()), len(procs), ready,
                       self.leader.epoch if ready else self.epoch, os.getpid(), socket.gethostname(),
                       keep(procs, self.leader.restarts.policy) if ready else None).to_wire()  # Restarts.orphans
        self.members.heard(hb)  # we are a member at once; the broker's echo proves we are heard
        ping = Ping(self.hostname, self.liveness.nonce()).to_wire() if self.election.always_consume else None
        self.sender.beat(hb, self._node_queue.name, ping, self.settings.heartbeat * 2)

    def _send_node(self, hostname: str, msg: Message) -> None:
        """The leader's sends to a worker: to us through ``_local``, after the current message (:meth:`_settle`)."""
        if hostname == self.hostname:
            self._local.append(msg)
        else:
            self.sender.to_node(hostname, msg)
