"""A worker's keyed processes: the pool the node talks to (spawn, deliver, stop, report).

:class:`Children` is a facade over the pool's parts, each in its own module with its owner:

* :mod:`~forseti_celery.worker.pool.table`: who is where, the one object the threads share
  (under its lock), and the record of one keyed process;
* :mod:`~forseti_celery.worker.pool.spawner`: the spawner thread, which forks (by the
  :mod:`~forseti_celery.worker.pool.zygote` where it runs, else :mod:`~forseti_celery.worker.pool.fork`)
  and keeps the spares;
* :mod:`~forseti_celery.worker.pool.watcher`: the watcher thread, which polls, reads and reaps;
* :mod:`~forseti_celery.worker.pool.outbox`: a child's mailbox, bounded by ``forseti_mailbox_limit``;
* :mod:`~forseti_celery.worker.pool.idle`: passivation of children idle past their ``idle_timeout``;
* :mod:`~forseti_celery.worker.pool.reports`: reports to the leader and answers to callers.

The methods here run on the node's threads: :meth:`Children.spawn`, :meth:`Children.deliver`
and :meth:`Children.stop_all` on its consumer thread, the rest on any. The node's consumer thread
is the only one that puts messages in a child's mailbox, but for the stop of an idle child, which
the watcher writes under the table's lock; no thread of the worker ever waits on a child's pipe or
for a fork.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ...child import runtime as child_main
from ...core.conf import MAX_TIMEOUT, ChildConfig
from ...core.messages import CALL, CORR, KEY_ADDRESSED, PID, REPLY_TO, STOP, TYPE, Reply
from ...core.pipe import Handoff, StopChild
from .idle import Idle
from .outbox import Closed, refuse
from .reports import Publish, Reports
from .spawner import Spawner
from .table import Child, Handing, Key, Start, Table, untaken_key_addressed
from .watcher import Waker, Watcher

__all__ = ["Child", "Children", "Start"]

Message = dict[str, Any]


class Children:
    """Spawn, deliver to, stop and watch the keyed processes of one worker."""

    def __init__(self, hostname: str, resolve: Callable[[str], Any], publish: Publish, leader_rk: str,
                 event: Callable[..., None], config: ChildConfig,
                 idle_of: Callable[[str], float | None] = lambda name: None,
                 names: Callable[[], Iterable[str]] = tuple) -> None:
        self.hostname = hostname
        self.config = config
        #: Shared with every child: see :class:`~forseti_celery.child.runtime.Lifeline` (in a memfd
        #: for a zygote started by exec).
        self.lifeline = child_main.Lifeline(config.fence_after, config.heartbeat / 2,
                                            mappable=config.zygote == "exec" and hasattr(os, "memfd_create"))
        self._stopping = threading.Event()
        self._table = Table()
        wake = self._wake = Waker()
        self._reports = Reports(hostname, leader_rk, publish, wake)
        self._watcher: Watcher
        self._spawner = Spawner(self._table, self._reports, config, self.lifeline, resolve, wake,
                                [wake.r, wake.w, *([] if self.lifeline.fd is None else [self.lifeline.fd])],
                                lambda box: self._watcher.on_writing(box), self._stopping, names)
        self._watcher = Watcher(self._table, self._reports, wake, self._spawner.refill, self.spawn_failed, event,
                                config.spares > 0, self._stopping, Idle(self._table, idle_of, config.stop_timeout))

    def start(self) -> None:
        """Start watching and spawning (and the zygote that forks the spares, where it can run)."""
        self._watcher.start(self._spawner.start_zygote())
        self._spawner.start()

    # -- from the consumer thread ---------------------------------------------------------
    def spawn(self, name: str, key: str, args: list[Any], sid: str, waiters: list[list[str]] | None = None,
              after: float = 0.0, restarts: int = 0, start: Start | None = None) -> None:
        """Start a keyed process for ``(name, key)`` unless one runs here already; ``waiters``
        are answered directly once it has started. A restart (its ``restarts`` count) is held
        ``after`` seconds first, a pending order meanwhile (in the registry report). ``start``:
        the leader's epoch, and a handoff's state (see :class:`~.table.Start`).

        A spare takes the key at once (a pipe write); otherwise the fork happens on the
        spawner thread, so the consumer thread (and the leader living on it) never waits for one.
        """
        k = (name, key)
        waiters = list(waiters or ())
        start = start or Start()
        now = self._spawner.busy_at = time.monotonic()
        with self._table.lock:
            if not after and k not in self._table.by_key and self._spawner.assign_spare(name, key, args, sid, waiters,
                                                                                        start):
                self._table.by_key[k].restarts = restarts
                return  # the watcher has the next spare forked once this one's answers are out
            self._table.pending[k] = (sid, args)
            if restarts:
                self._table.restarts[k] = restarts
        self._spawner.order(name, key, args, sid, waiters, restarts, now + after if after else 0.0, start)

    def deliver(self, batches: dict[Key, list[Message]]) -> dict[Key, list[Message]]:
        """Forward casts/calls/stops, grouped per key, each group in one frame; never waits for a
        pipe (see :meth:`~forseti_celery.worker.pool.outbox.Outbox.post`). A call its process's
        mailbox has no room for is answered with ``mailbox_full`` at once; a cast is dropped (and logged).

        A key-addressed cast or call whose process is not live here (gone, passivating or stopping,
        another pid, never here) is returned, per key in order, for the node to hold: it goes to the
        key's next incarnation (:mod:`~forseti_celery.worker.forwarding`). A written one moves its
        process's idle clock."""
        now = self._spawner.busy_at = time.monotonic()
        table = self._table
        held: dict[Key, list[Message]] = {}
        wake = False  # the watcher has something to do: answers or reports to send, a stop's deadline
        in_flight = self._reports.in_flight
        for k, msgs in batches.items():
            refused: list[Message] = []
            with table.lock:
                c = table.by_key.get(k)
                if c is None or c.gone:
                    live = []
                else:
                    ours = (None, c.pid)
                    if c.passivating or c.kill_at is not None:  # stopping: only what cannot go elsewhere follows
                        live = [m for m in msgs if not m.get(KEY_ADDRESSED) and m.get(PID) in ours]
                    else:
                        live = [m for m in msgs if m.get(PID) in ours]
                dead = [m for m in msgs if m not in live] if len(live) != len(msgs) else []
                if c is not None and live:
                    try:
                        refused = c.outbox.post(live)
                    except Closed as e:  # its end is closed: it has exited (the watcher reaps it)
                        calls = len(c.calls)
                        live, dead = self._exited(c, live, dead, e.refused)
                        in_flight.taken -= calls - len(c.calls)  # the next incarnation's now
                        wake = True
                    if refused:
                        live = [m for m in live if not any(m is r for r in refused)]
                    for m in live:
                        kind = m[TYPE]
                        if kind == CALL:
                            if m[CORR] not in c.calls:
                                in_flight.taken += 1
                            c.calls[m[CORR]] = m[REPLY_TO]
                            if m.get(KEY_ADDRESSED):
                                c.ka_calls.add(m[CORR])
                        elif kind == STOP:
                            if REPLY_TO in m:
                                c.stoppers.append((m[REPLY_TO], m[CORR]))
                            if c.kill_at is None:
                                c.kill_at = now + self._grace(m.get("grace"))
                                table.dying.add(c)
                                wake = True
                            continue
                        c.active_at = now
                    c.messages += len(live)
            for m in dead:
                if m.get(KEY_ADDRESSED) and m[TYPE] != STOP:
                    held.setdefault(k, []).append(m)
                else:
                    self._not_there(k, m)
                    wake = True
            if refused:
                assert c is not None
                refuse(c.outbox, c.key, c.name, c.pid, refused, self._reports.reply)
                wake = True
        if wake:  # (a written message wakes it through its mailbox if the pipe was full: Outbox.on_writing)
            self._wake()
        return held

    @staticmethod
    def _exited(c: Child, live: list[Message], dead: list[Message],
                refused: list[Message]) -> tuple[list[Message], list[Message]]:
        """Delivering ``live`` found ``c`` exited (under the table lock): what of ``live`` is in
        its pipe (taken), and what is not there: first the key-addressed messages of earlier
        deliveries it never took (its next incarnation's, in order), then ``dead``, then the
        rest of ``live`` (never written, or ``refused`` for want of room before its exit was seen)."""
        untaken = c.outbox.close()
        ours = {id(m) for m in live}
        unwritten = {id(m) for m in untaken} | {id(m) for m in refused}
        earlier = untaken_key_addressed(c, [m for m in untaken if id(m) not in ours])
        return ([m for m in live if id(m) not in unwritten],
                earlier + dead + [m for m in live if id(m) in unwritten])

    def untaken(self) -> dict[Key, list[Message]]:
        """The key-addressed messages reaped processes never took, per key in order (consumer
        thread, for the node to hold ahead of anything held since: they came first)."""
        if not self._table.untaken:  # a hint read without the lock: found on the next look
            return {}
        with self._table.lock:
            untaken, self._table.untaken = self._table.untaken, {}
        return untaken

    def incarnation(self, name: str, key: str) -> tuple[int, bool] | None:
        """``(pid, started)`` of the process of ``(name, key)`` here that takes messages (not
        passivating, not asked to stop), None if none does (consumer thread, for the node's
        held messages)."""
        with self._table.lock:
            c = self._table.by_key.get((name, key))
            if c is None or c.gone or c.passivating or c.kill_at is not None:
                return None
            return c.pid, c.started

    def on_exit(self, name: str, key: str, waiter: tuple[str, str]) -> bool:
        """Have ``waiter`` (``[reply queue, correlation id]``) answered once the process of
        ``(name, key)`` here is reaped, after its exit report; False if there is none (the key is
        free here already, or ordered and not forked yet)."""
        with self._table.lock:
            c = self._table.by_key.get((name, key))
            if c is None or c.gone:
                return False
            c.exit_waiters.append(waiter)
            return True

    def _grace(self, grace: Any) -> float:
        """Seconds a stopped process has to end: a stop's ``grace`` if it is one (a number of
        seconds, finite, 0 to MAX_TIMEOUT: anyone may write a stop, NaN included), else
        forseti_stop_timeout."""
        if type(grace) in (int, float) and 0 <= grace <= MAX_TIMEOUT:
            return float(grace)
        return self.config.stop_timeout

    def _not_there(self, k: Key, m: Message) -> None:
        if m[TYPE] == CALL:
            text = f"keyed process {k[1]!r} ({k[0]}) has exited"
            self._reports.reply(m[REPLY_TO], Reply.fail(m[CORR], "gone", text).to_wire())
        elif m[TYPE] == STOP and REPLY_TO in m:
            self._reports.not_there(k[0], k[1], [m[REPLY_TO], m[CORR]])

    def hand_off(self, name: str, key: str, pid: int | None, handing: Handing) -> bool:
        """Have the process of ``(name, key)`` (``pid`` if given) hand its state off: a
        ``handoff`` is written after what it has (it takes no key-addressed message any more: the
        node holds them for its next incarnation), it answers its snapshot and ends, and is killed
        if still alive at the handoff's deadline plus forseti_stop_timeout. False if it is not
        here, not started, or stopping already."""
        with self._table.lock:
            c = self._table.by_key.get((name, key))
            if (c is None or c.gone or not c.started or c.passivating or c.kill_at is not None
                    or (pid is not None and c.pid != pid)):
                return False
            try:
                c.outbox.post([Handoff().to_wire()])
            except Closed:
                return False
            c.handing = handing
            c.kill_at = handing.deadline + self.config.stop_timeout
            self._table.dying.add(c)
        self._wake()
        return True

    def handing_off(self) -> int:
        """How many processes are handing off now."""
        with self._table.lock:
            return sum(c.handing is not None for c in self._table.by_key.values())

    def stop_all(self, reason: str, grace: float, until: float = 0.0) -> bool:
        """Stop every keyed process (``terminate`` runs) but those handing off; True if all exits
        (theirs too, waited for until ``until``, ``time.monotonic()``) reached the broker. Restarts
        held for their back-off are dropped: the leader places them again once this worker has left."""
        with self._table.lock:
            keys = [k for k, c in self._table.by_key.items() if c.handing is None]
            for k in self._table.restarts:
                self._table.pending.pop(k, None)
        self.deliver({k: [StopChild(reason, grace).to_wire()] for k in keys})
        deadline = max(time.monotonic() + grace, until) + 3.0
        while time.monotonic() < deadline:
            with self._table.lock:
                if not self._table.by_key and self._reports.empty:
                    return True
            time.sleep(0.02)
        return False

    # -- from any thread --------------------------------------------------------------------
    def spawn_failed(self, name: str, key: str, sid: str, error: str, **fields: str) -> None:
        """Tell the leader that the start ordered as ``sid`` did not happen (retried until the
        broker takes it). ``unavailable`` has the key placed elsewhere."""
        self._reports.spawn_failed(name, key, sid, error, **fields)

    def snapshot(self) -> list[Child]:
        """The keyed processes running here now."""
        with self._table.lock:
            return list(self._table.by_key.values())

    @property
    def spares(self) -> int:
        """Spares forked and waiting for a key now."""
        with self._table.lock:
            return len(self._table.spares)

    @property
    def starts(self) -> int:
        """Keyed processes started here."""
        return self._watcher.starts

    @property
    def exits(self) -> int:
        """Keyed processes that have exited here (after they started)."""
        return self._watcher.exits

    def registry(self) -> list[list[Any]]:
        """``[name, key, pid or None while starting, sid]`` of every process here, ordered ones
        not forked yet included: what a node reports to its leader."""
        return self.registry_report()[0]

    def registry_args(self) -> list[list[Any] | None]:
        """The init args of each entry of :meth:`registry` (a list parallel to it), ``None`` where
        unknown: what a rebuilt leader gets back for each key (restarts and handoffs need them).
        Two calls see two moments: :meth:`registry_report` has both lists of one moment."""
        return self.registry_report()[1]

    def registry_report(self) -> tuple[list[list[Any]], list[list[Any] | None], list[int]]:
        """:meth:`registry`, :meth:`registry_args` and each entry's restart count, of one moment
        (parallel lists)."""
        with self._table.lock:
            return self._table.report()

    def stop(self) -> None:
        """Stop watching (after :meth:`stop_all`); kills whatever is left, spares included."""
        self._stopping.set()
        self._spawner.stop_thread()
        with self._table.lock:
            left = [*self._table.by_key.values(), *self._table.spares]
        for c in left:
            c.process.kill()
        self._spawner.stop_zygote()
        self._watcher.join(5)
        self.lifeline.close()  # (its memfd, if any: nothing forks any more)
