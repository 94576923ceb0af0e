"""The registry: a worker bootstep that gives every worker its keyed processes.

Each worker runs one :class:`Node`: a consumer thread with its own broker
connection (its queue, the heartbeat fanout and, when it leads, the leader
queue) and the :class:`~forseti_celery.worker.pool.children.Children` watcher. Running apart
from Celery's consumer keeps children alive across Celery's consumer restarts
and keeps a task blocked in ``get_key`` (solo pool) from stalling the leader.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter, deque
from typing import TYPE_CHECKING, Any

from celery.platforms import EX_FAILURE
from celery.utils.log import get_logger
from celery.worker import state as worker_state
from kombu import Consumer, Queue
from kombu.exceptions import OperationalError

from ..core import protocol as p
from ..core.broker import ConsumerLoop, Publisher, RestartIntensity
from ..core.errors import BrokerUnavailable, ConfigurationError, DuplicateWorker
from ..core.signing import signer_for
from .election import election_for
from .events import EventSender
from .leader import Leader
from .membership import Members
from .pool.children import Children

if TYPE_CHECKING:
    from ..core.installs import Installed

logger = get_logger(__name__)

__all__ = ["SUPPORTED_TRANSPORTS", "Node"]

#: Transports with what the leader election needs (single active consumer, or Redis for the lease).
SUPPORTED_TRANSPORTS = ("amqp", "redis")
_LEADER_TYPES = frozenset({p.GET, p.SEARCH, p.METRICS, p.STOP_KEY, p.SPAWNED, p.SPAWN_FAILED, p.EXITED, p.PING})
_TO_CHILD = frozenset({p.CAST, p.CALL, p.STOP})
#: Held, not handled, while a worker is not sure it still holds the leader role (see ``Node._stalled``).
_HELD_TYPES = _LEADER_TYPES | {p.REPORT, p.BYE}
_LOST = "lost"  # internal: a worker died while the role was in doubt, replayed once it is not


class Node:
    """One worker's share of the cluster: its keyed processes, and the leader role when it holds it."""

    def __init__(self, forseti: Installed, hostname: str) -> None:
        app = forseti.app
        self.forseti = forseti
        self.hostname = hostname
        self.settings = s = forseti.settings
        driver = app.connection_for_write().transport.driver_type
        if driver not in SUPPORTED_TRANSPORTS:
            raise ConfigurationError(
                f"forseti_celery needs a RabbitMQ (amqp) or Redis broker; {driver!r} has neither a single "
                "active consumer nor a lease for the leader queue")
        self.names = forseti.names
        self.incarnation = uuid.uuid4().hex
        self.eligible = not s.nodes or hostname in s.nodes
        self.epoch = 0  # highest leader epoch seen: orders from older leaders are refused
        self.members = Members(s.node_timeout)
        self.events = EventSender(app, hostname, s.namespace)
        # Worker secret set: everything we publish is signed, and worker messages we receive are
        # believed only signed (a message older than a worker's timeout says nothing true any more).
        self.signer = signer_for(s.worker_secret, hostname, s.node_timeout)
        self.publisher = Publisher(app.connection_for_write(), keep=self._queue_ttl, signer=self.signer)
        self.election = election_for(driver, app.connection_for_write(), f"{s.namespace}:leader", s.lease, hostname)
        self.leader = Leader(hostname, self.members, self._send_node, self._send_reply)
        self._out: dict[str, list[dict[str, Any]]] = {}  # what the consumer thread sends, per queue
        self.children = Children(hostname, forseti.resolve, self._send_many, self.names.leader, self.events.send,
                                 s.stop_timeout, s.fence_after, s.heartbeat, s.spares, s.mailbox_limit)
        self._node_queue = self.names.node_queue(hostname)
        self._next_beat = 0.0
        self._closing = False
        self._handed_over = threading.Event()  # closing: the role is left and the lease released
        self._last_echo = time.monotonic()
        self._fenced = False
        self._beats = 0  # heartbeats sent (their "seq"): an echo of a later one proves we are heard now
        self._doubt: int | None = None  # after a stall: the last beat sent before it
        self._held: list[dict[str, Any]] = []
        self._nonces: deque[str] = deque(maxlen=4)  # of our latest pings: a leader's answer names one
        self._twins: set[str] = set()  # incarnations of our hostname heard (and logged) since we started
        self._last_run = time.monotonic()
        # Longer than this without running a tick or a batch (stopped, swapped, starved), the
        # consumer thread may have been deposed meanwhile; well under the lease either way.
        self._stall_after = max(min(2 * s.heartbeat, s.lease / 2), 4 * min(0.25, s.heartbeat / 2))
        self.loop = ConsumerLoop(
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

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Make sure no live worker has our name, then start the watcher and the consumer thread;
        raises :class:`DuplicateWorker`."""
        try:
            self._check_alone()
        except DuplicateWorker:
            self.events.close()
            self.publisher.close()
            self.election.close()
            raise
        self.children.start()
        self.loop.start()
        logger.info("forseti: registry of %s started (eligible: %s)", self.hostname, self.eligible)

    def stop(self, grace: float | None = None) -> None:
        """Warm shutdown: hand the role over, stop every keyed process, report the exits."""
        self._closing = True
        self._await_handover()
        done = self.children.stop_all("shutdown", self.settings.stop_timeout if grace is None else grace)
        if not done:
            logger.warning("forseti: %s stopped before every exit reached the broker", self.hostname)
        # Only now, with every process gone: the leader frees what is left of ours at once.
        self._broadcast({"t": p.BYE, "node": self.hostname, "inc": self.incarnation})
        self.loop.stop()
        self.children.stop()
        self.events.close()
        self.publisher.close()
        self.election.close()

    def _check_alone(self) -> None:
        """Listen to the heartbeats for two intervals before taking any queue or key: a live worker
        of our name beats within one. Two workers of one name would share its queue, and every
        member would take each for the other restarting."""
        twin: list[dict[str, Any]] = []

        def on_message(message: Any) -> None:
            batch = p.decode(message.body)
            twin.extend(hb for hb in (batch if self.signer is None else self.signer.admit(message, batch))
                        if hb.get("t") == p.HEARTBEAT and hb.get("node") == self.hostname)

        deadline = time.monotonic() + 2 * self.settings.heartbeat
        conn = self.forseti.app.connection_for_read()
        try:
            with conn:
                conn.ensure_connection(max_retries=1)
                with Consumer(conn.channel(), [self.names.bcast_queue(self.hostname, self.incarnation)],
                              no_ack=True, on_message=on_message):
                    while not twin and time.monotonic() < deadline:
                        try:
                            conn.drain_events(timeout=max(0.001, min(0.25, deadline - time.monotonic())))
                        except TimeoutError:
                            pass
        except (OSError, OperationalError, *conn.connection_errors, *conn.channel_errors) as exc:
            logger.warning("forseti: %s could not listen for a live worker of its name: %r", self.hostname, exc)
            return
        if twin:
            hb = twin[0]
            where = f", pid {hb['pid']} on {hb['host']}" if "pid" in hb else ""
            raise DuplicateWorker(
                f"another worker named {self.hostname} (incarnation {hb['inc']}{where}) is alive in namespace "
                f"{self.settings.namespace!r}; refusing to start: give each worker a name of its own (-n)")

    def _give_up(self, exc: BaseException) -> None:
        """The consumer thread failed past its restart intensity: without it this worker neither
        hears nor serves the cluster, so it stops, as Celery's own signal handlers stop it (a
        warm shutdown, exit code 1), for its supervisor to restart it."""
        logger.critical("forseti: stopping worker %s: its registry thread failed more than %d times in %g s "
                        "(forseti_max_retries, forseti_max_time); last: %r",
                        self.hostname, self.settings.max_retries, self.settings.max_time, exc)
        worker_state.should_stop = EX_FAILURE

    def _await_handover(self) -> None:
        """Wait until the consumer thread has left the role and released it (see :meth:`_hand_over`)."""
        if not self.loop.is_alive():
            self._hand_over()  # nothing else acts on leader messages
        elif not self._handed_over.wait(max(1.0, 2 * self.settings.heartbeat)):
            # Stuck in a batch: releasing from here would let a successor lead beside it.
            logger.warning("forseti: %s could not hand the leader role over; it passes when the lease runs out",
                           self.hostname)

    def _connected(self) -> None:
        self._next_beat = 0.0
        self.members.refresh()  # we heard nothing while away: give everyone a fresh timeout
        self._tick()

    def _disconnected(self) -> None:
        # A lost connection loses the single active consumer slot (and maybe the lease).
        self._step_down()
        self._flush_out()

    # -- consumer thread ----------------------------------------------------------------------
    def _admit(self, message: Any, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """What of ``batch`` (decoded from the kombu ``message``) to act on: with a worker secret,
        only what its signature allows (:meth:`~forseti_celery.core.signing.Signer.admit`); and leader
        messages only from the leader queue. On RabbitMQ a leader message makes its receiver take
        the role (only the queue's active consumer gets one): a client's request written to a
        worker's own queue would make that worker lead beside the real leader."""
        if self.signer is not None:
            batch = self.signer.admit(message, batch)
        info = message.delivery_info or {}
        if not info.get("exchange") and info.get("routing_key") == self.names.leader:
            return batch
        kept = [m for m in batch if m.get("t") not in _LEADER_TYPES]
        if len(kept) != len(batch):
            logger.warning("forseti: %s dropped %d leader messages that did not come through the leader queue",
                           self.hostname, len(batch) - len(kept))
        return kept

    def _on_batch(self, batch: list[dict[str, Any]]) -> None:
        self._stalled(time.monotonic())
        self._handle(batch)
        self._flush_out()

    def _stalled(self, now: float) -> None:
        """Notice that this thread did not run for a while (SIGSTOP, swap, starvation).

        Meanwhile the lease may have run out, or RabbitMQ may have closed our connection and
        given the leader queue to a standby: until our own next heartbeat comes back (the
        connection is alive) and, on Redis, the lease is renewed, every leader message waits.
        Messages sent to a deposed leader go back to the leader queue, for the real one.
        """
        gap, self._last_run = now - self._last_run, now
        if gap <= self._stall_after or self._doubt is not None:
            return
        logger.warning("forseti: %s did not run for %.1f s; holding leader messages until the broker hears it",
                       self.hostname, gap)
        self._doubt = self._beats
        self._next_beat = 0.0
        self.members.refresh()  # we heard nothing while stopped: their silence proves nothing

    def _flush_out(self) -> None:
        """Publish what handling a batch (or a tick) produced: one broker message per queue."""
        out, self._out = self._out, {}
        for routing_key, msgs in out.items():
            try:
                self._send(routing_key, msgs)
            except BrokerUnavailable as exc:
                logger.warning("forseti: %d messages to %s lost: %s", len(msgs), routing_key, exc)

    def _handle(self, batch: list[dict[str, Any]]) -> None:
        """Handle a batch in order, each message on its own: one malformed message (forged, or
        from a broken client: clients may write to every queue) is logged and skipped, and costs
        none of the others, the casts collected before it included."""
        to_children: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for msg in batch:
            kind = msg.get("t")
            if kind == _LOST or type(kind) is not str:  # _LOST: our own note, only ever held
                if kind != _LOST:
                    logger.warning("forseti: %s skipped a message of no type", self.hostname)
                continue
            if kind in _TO_CHILD:
                if type(msg.get("n")) is str and type(msg.get("k")) is str:
                    to_children.setdefault((msg["n"], msg["k"]), []).append(msg)
                else:
                    logger.warning("forseti: %s skipped a %r message naming no key", self.hostname, kind)
                continue
            if to_children:  # keep the order of everything else relative to deliveries
                self._deliver(to_children)
                to_children = {}
            try:
                self._dispatch(kind, msg)
            except BrokerUnavailable:
                raise
            except Exception:
                logger.exception("forseti: %s skipped a malformed %r message", self.hostname, kind)
        if to_children:
            self._deliver(to_children)

    def _deliver(self, to_children: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
        try:
            self.children.deliver(to_children)
        except Exception:
            logger.exception("forseti: %s could not deliver %d messages", self.hostname,
                             sum(map(len, to_children.values())))

    def _dispatch(self, kind: str, msg: dict[str, Any]) -> None:
        if self._doubt is not None and kind in _HELD_TYPES:
            self._held.append(msg)
        elif kind in _LEADER_TYPES:
            if not self.leader.active:
                if self._closing or not self.election.always_consume:
                    if kind != p.PING:
                        self._forward([msg])  # popped as the role passed: for the new holder
                    return
                self.leader.activate(self.epoch)
                self.events.send(p.EVENT_LEADER, leader=self.hostname)
            if kind != p.PING:
                self.leader.handle(msg)
            elif self.leader.ready and "node" in msg:
                # Only the active consumer hears a ping: its answer tells the pinger who leads.
                self._send_node(msg["node"], {"t": p.LEADS, "leader": self.hostname, "epoch": self.leader.epoch,
                                              "nonce": msg.get("nonce")})
        elif kind == _LOST:
            self._lost(msg["node"])
        elif kind == p.HEARTBEAT:
            self._heard(msg)
        elif kind == p.BYE:
            if msg["node"] != self.hostname and self.members.remove(msg["node"], str(msg.get("inc"))):
                self._lost(msg["node"])
        elif kind == p.LEADS:
            self._leads(msg)
        elif kind == p.SPAWN:
            self._spawn(msg)
        elif kind == p.REPORT_REQUEST:
            if int(msg["epoch"]) != self.epoch:
                self._backed(int(msg["epoch"]), msg["leader"])
            self._send_node(msg["leader"], {"t": p.REPORT, "node": self.hostname, "epoch": self.epoch,
                                            "procs": self.children.registry(), "q": msg.get("q", 0)})
        elif kind == p.REPORT:
            self.leader.report(msg)

    def _spawn(self, msg: dict[str, Any]) -> None:
        epoch = int(msg["epoch"])
        if epoch != self.epoch and self._backed(epoch, str(msg.get("leader"))) is False:
            logger.warning("forseti: refused spawn of %r from %s: the election granted no epoch %d to it "
                           "(latest: %d)", msg["k"], msg.get("leader"), epoch, self.epoch)
            return
        if epoch < self.epoch:
            logger.warning("forseti: refused spawn of %r from deposed leader %s (epoch %d < %d)",
                           msg["k"], msg.get("leader"), epoch, self.epoch)
            return
        if not self._available():
            # Stopping, cut off, or not sure we are heard: the leader places it elsewhere.
            self.children.spawn_failed(msg["n"], msg["k"], msg["sid"], "unavailable")
            return
        self.children.spawn(msg["n"], msg["k"], msg.get("a", []), msg["sid"], msg.get("w"))

    def _heard(self, hb: dict[str, Any]) -> None:
        recovered = False
        if hb["node"] == self.hostname and hb["inc"] == self.incarnation:
            self._last_echo = time.monotonic()  # our own beat came back: the broker hears us
            self.children.lifeline.heard(self._last_echo)
            recovered = self._doubt is not None and int(hb.get("seq", 0)) > self._doubt
        if self.members.heard(hb) is None:
            self._twin(hb)
            return
        if recovered:  # after recording the echo, a beat sent in doubt: _trust's own beat is the truth
            self._doubt = None
            self._trust()
        epoch = int(hb.get("epoch", 0))
        if hb.get("leader") and hb["node"] != self.hostname and epoch > max(self.epoch, self.leader.epoch):
            if self._backed(epoch, hb["node"]) and self.leader.active and epoch > self.leader.epoch:
                logger.warning("forseti: %s leads with a newer epoch (%d); stepping down", hb["node"], epoch)
                self._step_down()
        if self._doubt is None:
            self.leader.heartbeat(hb)

    def _backed(self, epoch: int, leader: str) -> bool | None:
        """Whether the election granted ``leader`` the term ``epoch`` (Redis: its holder key, read
        now); None when that cannot be read here (RabbitMQ: see :meth:`_leads`). The epoch below
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

    def _leads(self, msg: dict[str, Any]) -> None:
        """RabbitMQ: the answer to one of our latest pings, which only the leader queue's active
        consumer heard (the nonce proves it): the epoch to hold, and whether we still lead."""
        if msg.get("nonce") not in self._nonces:
            return
        self.epoch = max(self.epoch, int(msg["epoch"]))
        if self.leader.active and msg["leader"] != self.hostname:
            logger.warning("forseti: %s answers the leader queue (epoch %s); stepping down",
                           msg["leader"], msg["epoch"])
            self._step_down()

    def _twin(self, hb: dict[str, Any]) -> None:
        """A heartbeat of a live member's hostname from another incarnation: not believed until the
        member times out or says goodbye (a restart after a crash, a second worker of one name, or
        a forged heartbeat); said once per incarnation, as an error if it is our own name."""
        if hb["inc"] in self._twins or len(self._twins) >= 64:
            return
        self._twins.add(hb["inc"])
        ours = hb["node"] == self.hostname
        logger.log(logging.ERROR if ours else logging.WARNING,
                   "forseti: heartbeats naming %s from another incarnation (%s, pid %s on %s) are not believed "
                   "while %s beats: %s", hb["node"], hb["inc"], hb.get("pid"), hb.get("host"),
                   "this worker" if ours else "the live one",
                   "two workers have this name" if ours else "a restart, two workers of one name, or forged")

    def _trust(self) -> None:
        """Heard again after a stall: handle what was held (its leader messages go to whoever leads)."""
        # Say at once that we take keys again: the beats sent in doubt called us ineligible, and a
        # leader (we, perhaps, once the held requests are replayed) would refuse new keys for a
        # heartbeat with "no eligible live worker".
        self._next_beat = time.monotonic() + self.settings.heartbeat
        self._beat()
        held, self._held = self._held, []
        if held:
            logger.info("forseti: %s is heard again; handling %d held messages", self.hostname, len(held))
        for msg in held:
            try:
                self._dispatch(msg["t"], msg)
            except BrokerUnavailable:
                raise
            except Exception:
                logger.exception("forseti: %s skipped a malformed held %r message", self.hostname, msg["t"])

    def _available(self) -> bool:
        """Whether this worker takes new keyed processes now."""
        return not (self._closing or self._fenced or self._doubt is not None)

    def _tick(self) -> None:
        now = time.monotonic()
        self._stalled(now)
        connected = self.loop.connected.is_set()
        held = self.election.poll() if connected and not self._closing else False
        if held is not None:
            self._lease(held)
        if self._closing and not self._handed_over.is_set():
            self._hand_over()
        if connected:  # silence heard while we cannot hear anything proves nothing
            for dead in self.members.expire(now):
                logger.info("forseti: worker %s is silent; declared dead", dead.hostname)
                self._lost(dead.hostname)
        self._fence(now)
        if self.leader.ready:
            self.leader.expire()
        if connected and now >= self._next_beat:
            self._next_beat = now + self.settings.heartbeat
            self._beat()
        self._flush_out()

    def _fence(self, now: float) -> None:
        # Cut off from the broker for longer than this, the leader may soon declare us dead and
        # start our keys elsewhere: stop our processes first, so no key ever has two.
        silent = now - self._last_echo
        if silent > self.settings.fence_after and not self._fenced:
            self._fenced = True
            victims = self.children.snapshot()
            logger.warning("forseti: %s has not heard the broker for %.1f s; stopping its %d keyed processes",
                           self.hostname, silent, len(victims))
            for c in victims:
                c.process.kill()
        elif silent <= self.settings.fence_after and self._fenced:
            logger.info("forseti: %s hears the broker again", self.hostname)
            self._fenced = False

    def _lost(self, hostname: str) -> None:
        """A worker died or left (or restarted): the leader frees its keys and tells clients."""
        if self._doubt is not None:
            self._held.append({"t": _LOST, "node": hostname})
        elif self.leader.active:
            self.leader.node_lost(hostname)
            self.events.send(p.EVENT_NODE_LOST, node=hostname)

    def _lease(self, held: bool) -> None:
        if held and not self.leader.active and not self._closing:
            token = self.election.token
            self.epoch = self.epoch if token is None else token
            self.leader.activate(self.epoch, token)
            self.loop.add_queue(self.names.leader_queue)
            self.events.send(p.EVENT_LEADER, leader=self.hostname)
        elif not held and self.leader.active:
            self._step_down()

    def _hand_over(self) -> None:
        """Closing: leave the role, and only then let a successor take it (a standby at once, not
        when the lease runs out). On the consumer thread, between two batches, so this worker acts
        on no leader message once another may lead."""
        if self.leader.active:
            self._step_down()
        self.loop.cancel_queue(self.names.leader_queue)  # RabbitMQ: the broker picks another consumer now
        self.election.release()
        self._handed_over.set()

    def _step_down(self) -> None:
        """Leave the role (lease lost, connection lost, or a newer leader heard): messages held for
        it go back to the leader queue."""
        if not self.election.always_consume:
            self.loop.cancel_queue(self.names.leader_queue)
        self.leader.deactivate()
        held, self._held = self._held, []
        self._forward([m for m in held if m["t"] in _LEADER_TYPES and m["t"] != p.PING])

    def _forward(self, msgs: list[dict[str, Any]]) -> None:
        if msgs:
            self._out.setdefault(self.names.leader, []).extend(msgs)

    def _beat(self) -> None:
        self._beats += 1
        hb = {"t": p.HEARTBEAT, "node": self.hostname, "inc": self.incarnation, "seq": self._beats,
              "eligible": self.eligible and self._available(),
              "names": sorted(self.forseti.known_names()), "count": len(self.children.snapshot()),
              "leader": self.leader.ready, "epoch": self.leader.epoch if self.leader.ready else self.epoch,
              "pid": os.getpid(), "host": socket.gethostname()}
        self.members.heard(hb)  # we are a member at once; the broker's echo proves we are heard
        self._broadcast(hb)
        try:  # Redis: our queue outlives any backlog we drain, as each push makes it outlive us
            self.publisher.keep_alive(self._node_queue.name)
        except BrokerUnavailable:
            pass
        if self.election.always_consume:
            # Lets the single active consumer learn that it leads, even when no client asks anything.
            try:
                nonce = uuid.uuid4().hex
                self._nonces.append(nonce)
                self.publisher.publish(self.names.exchange, self.names.leader,
                                       [{"t": p.PING, "node": self.hostname, "nonce": nonce}],
                                       expiration=self.settings.heartbeat * 2)
            except BrokerUnavailable:
                pass

    # -- sending --------------------------------------------------------------------------
    def _send_node(self, hostname: str, msg: dict[str, Any]) -> None:
        if hostname == self.hostname:
            self._handle([msg])
            return
        self._out.setdefault(self.names.node_routing_key(hostname), []).append(msg)

    def _send_reply(self, routing_key: str, msg: dict[str, Any]) -> None:
        self._out.setdefault(routing_key, []).append(msg)

    def _send(self, routing_key: str, msgs: list[dict[str, Any]]) -> None:
        self.publisher.publish(self.names.exchange, routing_key, msgs, declare=self._declare(routing_key))

    def _send_many(self, batches: list[tuple[str, list[dict[str, Any]]]]) -> None:
        self.publisher.publish_many(self.names.exchange, batches, self._declare)

    def _queue_ttl(self, routing_key: str) -> float | None:
        """Redis: a node queue's TTL (:meth:`~forseti_celery.core.protocol.Names.queue_ttl`), and as much
        for the leader queue, whose list a client's push keeps only until its own deadline (worker
        reports must outlive a short-deadline request pushed before them)."""
        return p.NODE_QUEUE_EXPIRES if routing_key == self.names.leader else self.names.queue_ttl(routing_key)

    def _declare(self, routing_key: str) -> list[Queue]:
        return [self.names.leader_queue] if routing_key == self.names.leader else []

    def _broadcast(self, msg: dict[str, Any]) -> None:
        try:
            self.publisher.publish(self.names.bcast_exchange, "", [msg])
        except BrokerUnavailable:
            pass

    def info(self) -> dict[str, Any]:
        """The ``forseti`` section of ``celery inspect stats``."""
        procs = self.children.snapshot()
        return {
            "namespace": self.settings.namespace,
            "leader": self.leader.ready,
            "eligible": self.eligible,
            "processes": dict(Counter(c.name for c in procs)),
            "total": len(procs),
            "spares": self.children.spares,
            "starts": self.children.starts,
            "exits": self.children.exits,
            "epoch": self.epoch,
            "members": sorted(m.hostname for m in self.members),
            # Worker messages without a valid signature, per reason (None: no worker secret set).
            "dropped": None if self.signer is None else dict(self.signer.dropped),
            **({"table": self.leader.info()} if self.leader.active else {}),
        }
