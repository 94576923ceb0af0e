"""Whether a worker is heard: its heartbeats (their count and the nonces of its pings), the echo of
its own beats, stall detection (the doubt after the consumer thread did not run for a while),
fencing (its keyed processes killed when the broker has not echoed a beat for too long), and the
twins (other incarnations of a live member's name) already logged, and the check at start that
no live worker has our name (:func:`check_alone`).

Threads: every field belongs to the ``forseti-node`` consumer thread, which alone calls these
methods (tests drive them by hand on a node that was never started), but :attr:`Liveness.left`,
set once by a leaving worker's main thread after its ``bye`` (:mod:`~forseti_celery.worker.leaving`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from typing import Any

from celery.utils.log import get_logger
from kombu import Consumer
from kombu.exceptions import OperationalError

from ..core import protocol as p
from ..core.conf import Settings
from ..core.errors import DuplicateWorker
from ..core.messages import TYPE
from ..core.protocol import Names
from ..core.signing import Signer
from .membership import Members
from .pool.children import Children

logger = get_logger(__name__)

__all__ = ["Liveness", "check_alone"]


class Liveness:
    """A worker's own heartbeat clock, the echo of its beats, its stalls and its fence."""

    def __init__(self, hostname: str, settings: Settings, members: Members, children: Children) -> None:
        self.hostname = hostname
        self.settings = settings
        self.members = members
        self.children = children
        self.next_beat = 0.0
        self.last_echo = time.monotonic()
        self.fenced = False
        #: Said ``bye``: no more heartbeats (the leader would take them for a new member).
        self.left = False
        self.beats = 0  # heartbeats sent (their "seq"): an echo of a later one proves we are heard now
        self.doubt: int | None = None  # after a stall: the last beat sent before it
        self.last_run = time.monotonic()
        # Longer than this without running a tick or a batch (stopped, swapped, starved), the
        # consumer thread may have been deposed meanwhile; well under the lease either way.
        s = settings
        self.stall_after = max(min(2 * s.heartbeat, s.lease / 2), 4 * min(0.25, s.heartbeat / 2))
        self._nonces: deque[str] = deque(maxlen=4)  # of our latest pings: a leader's answer names one
        self._twins: set[str] = set()  # incarnations of a live member's hostname heard (and logged)

    @property
    def sure(self) -> bool:
        """Neither fenced nor in doubt: this worker may take new keys (when not closing)."""
        return not self.fenced and self.doubt is None

    def stalled(self, now: float) -> None:
        """Notice that this thread did not run for a while (SIGSTOP, swap, starvation).

        Meanwhile the lease may have run out, or RabbitMQ may have closed our connection and
        given the leader queue to a standby: until our own next heartbeat comes back (the
        connection is alive) and, on Redis, the lease is renewed, every leader message waits.
        Messages sent to a deposed leader go back to the leader queue, for the real one.
        """
        gap, self.last_run = now - self.last_run, now
        if gap <= self.stall_after or self.doubt is not None:
            return
        logger.warning("forseti: %s did not run for %.1f s; holding leader messages until the broker hears it",
                       self.hostname, gap)
        self.doubt = self.beats
        self.next_beat = 0.0
        self.members.refresh()  # we heard nothing while stopped: their silence proves nothing

    def echo(self, hb: dict[str, Any]) -> bool:
        """Our own beat ``hb`` came back: the broker hears us. Whether it was sent after the doubt
        began (then the doubt is over once the caller has recorded it: :meth:`trusted`)."""
        self.last_echo = time.monotonic()
        self.children.lifeline.heard(self.last_echo)
        return self.doubt is not None and int(hb.get("seq", 0)) > self.doubt

    def trusted(self) -> None:
        """Heard again after a stall: the doubt is over, and the caller beats at once (the beats
        sent in doubt called us ineligible: a leader would refuse new keys for a heartbeat)."""
        self.doubt = None
        self.next_beat = time.monotonic() + self.settings.heartbeat

    def beat_due(self, now: float) -> bool:
        """Whether a heartbeat is due now (then the next one is a heartbeat from now)."""
        if now < self.next_beat or self.left:
            return False
        self.next_beat = now + self.settings.heartbeat
        return True

    def next_seq(self) -> int:
        """The ``seq`` of the heartbeat about to be sent."""
        self.beats += 1
        return self.beats

    def nonce(self) -> str:
        """A fresh nonce for a ping to the leader queue (RabbitMQ): its answer names it."""
        nonce = uuid.uuid4().hex
        self._nonces.append(nonce)
        return nonce

    def pinged(self, nonce: object) -> bool:
        """Whether ``nonce`` is of one of our latest pings (only the active consumer heard it)."""
        return nonce in self._nonces

    def fence(self, now: float) -> None:
        """Cut off from the broker for longer than ``forseti_fence_after``, the leader may soon
        declare us dead and start our keys elsewhere: stop our processes first, so no key ever
        has two."""
        silent = now - self.last_echo
        if silent > self.settings.fence_after and not self.fenced:
            self.fenced = True
            victims = self.children.snapshot()
            logger.warning("forseti: %s has not heard the broker for %.1f s; stopping its %d keyed processes",
                           self.hostname, silent, len(victims))
            for c in victims:
                c.process.kill()
        elif silent <= self.settings.fence_after and self.fenced:
            logger.info("forseti: %s hears the broker again", self.hostname)
            self.fenced = False

    def twin(self, hb: dict[str, Any]) -> None:
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


def check_alone(app: Any, names: Names, hostname: str, incarnation: str, signer: Signer | None,
                listen: float) -> None:
    """Listen to the heartbeats for ``listen`` seconds (two intervals) before taking any queue or
    key: a live worker of our name beats within one. Two workers of one name would share its
    queue, and every member would take each for the other restarting. Raises
    :class:`~forseti_celery.core.errors.DuplicateWorker`."""
    twin: list[dict[str, Any]] = []

    def on_message(message: Any) -> None:
        batch = p.decode(message.body)
        twin.extend(hb for hb in (batch if signer is None else signer.admit(message, batch))
                    if hb.get(TYPE) == p.HEARTBEAT and hb.get("node") == hostname)

    deadline = time.monotonic() + listen
    conn = app.connection_for_read()
    try:
        with conn:
            conn.ensure_connection(max_retries=1)
            with Consumer(conn.channel(), [names.bcast_queue(hostname, incarnation)],
                          no_ack=True, on_message=on_message):
                while not twin and time.monotonic() < deadline:
                    try:
                        conn.drain_events(timeout=max(0.001, min(0.25, deadline - time.monotonic())))
                    except TimeoutError:
                        pass
    except (OSError, OperationalError, *conn.connection_errors, *conn.channel_errors) as exc:
        logger.warning("forseti: %s could not listen for a live worker of its name: %r", hostname, exc)
        return
    if twin:
        hb = twin[0]
        where = f", pid {hb['pid']} on {hb['host']}" if "pid" in hb else ""
        raise DuplicateWorker(
            f"another worker named {hostname} (incarnation {hb['inc']}{where}) is alive in namespace "
            f"{names.namespace!r}; refusing to start: give each worker a name of its own (-n)")
