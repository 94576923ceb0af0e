"""Forking: the spawner thread, the spares it keeps forked ahead, and giving a spare its key.

Forking happens on a spawner thread that lives as long as the worker's node
(``PR_SET_PDEATHSIG`` fires when the *thread* that forked exits), so neither the consumer
thread nor the leader on it ever waits for a fork. The spawner keeps a few *spares* forked
ahead (``forseti_spares``): a spare is a keyed process that has not been given its key yet, so
a new key costs a pipe write, not a fork and a process start; the spawner has the next one
forked behind it (once the worker has been quiet for a moment while another is at hand; with
none left at once, all in one request), and one forked at once for a key that finds none left,
by the worker's :mod:`~forseti_celery.worker.pool.zygote` where it runs (Linux), else by itself
(:mod:`~forseti_celery.worker.pool.fork`).

Owners: the orders queue is the consumer's way in (:meth:`Spawner.order`); the refill deadline
and back-off belong to the spawner thread; :attr:`Spawner.busy_at` is written by the consumer
thread and read by the spawner as a hint (a float); the zygote is forked by the worker's main
thread before any of the pool's threads runs, asked for forks by the spawner thread only, and
its exits read by the watcher (its ``alive`` flag only ever turns False, from either thread:
a fork or a read that finds it ended). What the threads share is in the
:class:`~forseti_celery.worker.pool.table.Table`.
"""

from __future__ import annotations

import heapq
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import billiard
import billiard.connection
from celery.utils.log import get_logger

from ...child import runtime as child_main
from ...core import protocol as p
from ...core.conf import ChildConfig
from ...core.pipe import Assign
from . import zygote as zygote_mod
from .fork import KeyedChild
from .outbox import Outbox
from .reports import Reports
from .table import Child, Start, Table

logger = get_logger(__name__)

__all__ = ["Spawner"]

#: name, key, args, sid, waiters, restarts, when it is due (``time.monotonic()``; 0: now), its start's extras
_Order = tuple[str, str, list[Any], str, list[list[str]], int, float, Start]
_NONE = Start()
_REFILL: _Order = ("", "", [], "", [], 0, 0.0, _NONE)  # the spawner's cue to fork spares up to the target
_QUIET = 0.01  # seconds without spawns or deliveries before a spare is forked while another is at hand
_RETRY_FIRST, _RETRY_MAX = 0.25, 8.0  # seconds before a spare is forked again after a failed fork (doubling)


class Spawner:
    """Forks keyed processes (for a key, or spares) on a thread of its own."""

    def __init__(self, table: Table, reports: Reports, config: ChildConfig, lifeline: child_main.Lifeline,
                 resolve: Callable[[str], Any], wake: Callable[[], None], worker_fds: list[int],
                 on_writing: Callable[[Outbox], None], stopping: threading.Event,
                 names: Callable[[], Iterable[str]] = tuple) -> None:
        self._table = table
        self._names = names  # the registered keyed-process names (a zygote started by exec imports them)
        self._reports = reports
        self._config = config
        self._lifeline = lifeline
        self._resolve = resolve
        self._wake = wake
        self._worker_fds = worker_fds  # the watcher's wake pipe: no child keeps it open
        self._on_writing = on_writing
        self._stopping = stopping
        self._orders: queue.SimpleQueue[_Order | None] = queue.SimpleQueue()
        self._refill_at = 0.0  # spawner thread only: no spare forked before (after a failed fork)
        #: When the consumer thread last had work for the children.
        self.busy_at = 0.0
        self.zygote: zygote_mod.Zygote | None = None
        self._thread = threading.Thread(target=self._run, name="forseti-spawner", daemon=True)

    def start_zygote(self) -> zygote_mod.Zygote | None:
        """Fork the zygote, where it runs and spares are wanted (from the worker's main thread,
        before the pool's threads run: the zygote dies with it)."""
        if self._config.spares and zygote_mod.available():
            refs = self._exec_refs() if self._config.zygote == "exec" else None
            if refs is not None:
                try:
                    self.zygote = zygote_mod.Zygote(KeyedChild, self._config, self._lifeline, self._resolve,
                                                    self._worker_fds, refs=refs)
                    return self.zygote
                except Exception:
                    logger.exception("forseti: could not start the zygote by exec; it is forked")
            try:
                self.zygote = zygote_mod.Zygote(KeyedChild, self._config, self._lifeline, self._resolve,
                                                self._worker_fds)
            except Exception:
                logger.exception("forseti: no zygote; spares are forked by the worker")
                self.zygote = None
        return self.zygote

    def _exec_refs(self) -> dict[str, str] | None:
        """Every registered keyed process by ``"module:qualname"``, for a zygote started by exec;
        ``None`` (logged: the zygote is forked) if one cannot be imported by name."""
        if self._lifeline.fd is None:
            logger.warning("forseti: forseti_zygote is 'exec', but this system has no memfd: the zygote is forked")
            return None
        refs: dict[str, str] = {}
        for name in sorted(self._names()):
            target = self._resolve(name)
            ref = zygote_mod.ref_of(target)
            if ref is None:
                logger.warning("forseti: forseti_zygote is 'exec', but keyed process %r (%r) cannot be imported "
                               "by name (defined in __main__ or in a function): the zygote is forked", name, target)
                return None
            refs[name] = ref
        return refs

    def start(self) -> None:
        self._thread.start()
        if self._config.spares:
            self.refill()

    def stop_thread(self) -> None:
        """End the spawner thread (a fork under way completes first)."""
        self._orders.put(None)
        self._thread.join(5)

    def stop_zygote(self) -> None:
        """End the zygote, and with it the spares it forked (after :meth:`stop_thread`)."""
        if self.zygote is not None:
            self.zygote.stop()

    def order(self, name: str, key: str, args: list[Any], sid: str, waiters: list[list[str]], restarts: int = 0,
              due: float = 0.0, start: Start = _NONE) -> None:
        """Start a keyed process for the key (the spawner thread forks it), at ``due`` if given
        (a restart's back-off: held by the spawner thread, no thread or wake-up of its own)."""
        self._orders.put((name, key, args, sid, waiters, restarts, due, start))

    def refill(self) -> None:
        """Fork spares up to the target (any thread)."""
        self._orders.put(_REFILL)

    # -- any thread holding the table's lock -------------------------------------------------
    def assign_spare(self, name: str, key: str, args: list[Any], sid: str, waiters: list[list[str]],
                     start: Start = _NONE) -> bool:
        """Give the key to a spare (under the table's lock); False if none is left. Not when cut
        off: the spawner then answers "unavailable"."""
        table = self._table
        while table.spares and not self._lifeline.cut_off() and self._resolve(name) is not None \
                and (self.zygote is None or self.zygote.serves(name)):
            c = table.spares.popleft()
            if self._give(c, name, key, args, sid, waiters, start):
                table.by_key[(name, key)] = c
                if not c.watched:
                    self._wake()  # its "started" must not wait for the watcher's next round
                return True
        return False

    @staticmethod
    def _give(c: Child, name: str, key: str, args: list[Any], sid: str, waiters: list[list[str]],
              start: Start = _NONE) -> bool:
        """Send a spare its key (and a handoff's state); False if it has died meanwhile (the
        watcher reaps it)."""
        try:
            c.outbox.send([_assign(name, key, args, sid, start)])
        except OSError:
            return False
        c.name, c.key, c.sid, c.args, c.waiters, c.spare = name, key, sid, args, waiters, False
        c.moved_from = None if start.source is None else (start.source, start.since or time.time())
        c.started_at = time.time()
        return True

    # -- spawner thread ---------------------------------------------------------------------
    def _run(self) -> None:
        # Long-lived on purpose: PR_SET_PDEATHSIG fires when the thread that forked exits.
        refill = False
        backoff = _RETRY_FIRST
        held: list[tuple[float, int, _Order]] = []  # restarts held for their back-off, soonest first
        tie = itertools.count()
        while True:
            now = time.monotonic()
            waits = ([self._refill_wait()] if refill else []) + ([held[0][0] - now] if held else [])
            try:
                if held and held[0][0] <= now:
                    order: _Order | None = heapq.heappop(held)[2]
                else:
                    order = self._orders.get(timeout=max(0.0, min(waits)) if waits else None)
            except queue.Empty:  # time to fork a spare, unless the worker got busy meanwhile
                if not refill or self._refill_wait() > 0:
                    continue  # (or a held order is due)
                try:
                    refill = self._fork_spare()
                except Exception as exc:
                    # Out of processes, fds or memory, most likely: tried again later, not in a loop
                    # (a new key still gets its fork at once, and its own error).
                    log = logger.warning if isinstance(exc, OSError) else logger.exception
                    log("forseti: could not fork a spare keyed process (%s); trying again in %.2g s", exc, backoff)
                    self._refill_at = time.monotonic() + backoff
                    backoff = min(backoff * 2, _RETRY_MAX)
                    refill = True
                else:
                    backoff = _RETRY_FIRST
                continue
            if order is None:
                return
            if order is _REFILL:
                refill = True
                continue
            name, key, args, sid, waiters, restarts, due, start = order
            if due > time.monotonic():
                heapq.heappush(held, (due, next(tie), order))
                continue
            if due:
                with self._table.lock:  # dropped (its worker stops) or superseded meanwhile?
                    if self._table.pending.get((name, key), ("",))[0] != sid:
                        if (name, key) not in self._table.pending:
                            self._table.restarts.pop((name, key), None)
                        continue
            try:
                self._spawn(name, key, args, sid, waiters, start)
            except Exception as exc:
                logger.exception("forseti: could not start %r", key)
                self._reports.spawn_failed(name, key, sid, "start", type=type(exc).__name__, msg=str(exc))
            finally:
                with self._table.lock:
                    if self._table.pending.get((name, key), ("",))[0] == sid:
                        del self._table.pending[(name, key)]
                        self._table.restarts.pop((name, key), None)
                        c = self._table.by_key.get((name, key))
                        if c is not None and c.sid == sid and restarts:
                            c.restarts = restarts

    def _refill_wait(self) -> float:
        # A spare forked while another is still at hand waits until the worker has been quiet for
        # a moment: a fork here holds the interpreter for milliseconds, and one by the zygote, with
        # the new spare's first steps, takes a core for about as long, which would delay the call
        # that usually follows a start (on two cores, the first call took 2-3x a later one).
        now = time.monotonic()
        with self._table.lock:
            at_hand = bool(self._table.spares)
        return max(0.0, self._refill_at - now, self.busy_at + _QUIET - now if at_hand else 0.0)

    def _fork_spare(self) -> bool:
        """Fork one spare if fewer than the target are ready; True while more are wanted."""
        with self._table.lock:
            wanted = self._config.spares - len(self._table.spares)
        if wanted <= 0 or self._stopping.is_set() or self._lifeline.cut_off():
            return False  # (cut off: the next start after we hear the broker again asks anew)
        c = None
        if self._zygote_alive():
            try:  # none at hand (a burst, the worker's start): every one wanted in one request
                c = self._fork_from_zygote(wanted - 1 if wanted == self._config.spares else 0)
            except EOFError:
                logger.warning("forseti: the zygote has ended; the worker forks keyed processes itself")
        if c is None:
            c = self._fork(None, "spare", "", [], "")
        with self._table.lock:
            c.spare = True
            self._table.spares.append(c)
            self._table.new.append(c)  # watched from the watcher's next round: no wake-up just for it
            return len(self._table.spares) < self._config.spares

    def _zygote_alive(self) -> bool:
        return self.zygote is not None and self.zygote.alive

    def _child(self, name: str, key: str, sid: str, process: Any, conn: Any, args: list[Any] | None) -> Child:
        fd = conn.fileno()
        return Child(name, key, sid, process, conn, fd, Outbox(fd, self._config.mailbox_limit, self._on_writing),
                     args=args)

    def _fork_from_zygote(self, ahead: int = 0) -> Child:
        """A spare from the zygote, and ``ahead`` more in the same round trip, kept as spares
        (the orders queued behind this one: a handoff's burst of keys then waits for one wake-up
        of the zygote, not one per fork). :class:`OSError` if none could be forked."""
        assert self.zygote is not None
        got = self.zygote.fork_many(1 + ahead)
        kids = [self._child("spare", "", "", g[0], billiard.connection.Connection(g[1]), None)
                for g in got if not isinstance(g, OSError)]
        if not kids:
            raise next(g for g in got if isinstance(g, OSError))
        if len(kids) > 1:
            with self._table.lock:
                for c in kids[1:]:
                    c.spare = True
                    self._table.spares.append(c)
                    self._table.new.append(c)
            self._wake()
        return kids[0]

    def _fork(self, target: Any, name: str, key: str, args: list[Any], sid: str, epoch: int = 0) -> Child:
        """A fork of the worker; :class:`OSError` if a resource ran out (nothing left open then)."""
        parent_end, child_end = billiard.Pipe(duplex=True)
        with self._table.lock:
            # The child keeps none of the worker's pipe ends: end-of-file then means "worker gone".
            inherited = [*self._worker_fds, parent_end.fileno(), *self._table.inherited_fds(),
                         *(self.zygote.fds if self.zygote is not None else ())]
        start = None if target is None else (target, key, args)
        proc = KeyedChild(
            target=child_main.run, name=f"forseti:{name}",
            args=(child_end, self._config, self._lifeline, self._resolve, os.getpid(), inherited, start),
            kwargs={} if target is None else {"assign": Assign(name, key, args, None, epoch, sid)},
        )
        try:
            proc.start()
        except OSError:
            parent_end.close()
            raise
        finally:
            child_end.close()
        return self._child(name, key, sid, proc, parent_end, None if target is None else args)

    def _spawn(self, name: str, key: str, args: list[Any], sid: str, waiters: list[list[str]],
               start: Start = _NONE) -> None:
        k = (name, key)
        table = self._table
        with table.lock:
            existing = table.by_key.get(k)
            if existing is not None:
                existing.sid = sid  # the leader's current order names it now
                if not existing.started:
                    existing.waiters.extend(waiters)
                started = existing.started
            elif self.assign_spare(name, key, args, sid, waiters, start):
                return
        if existing is not None:
            if started:
                self._reports.spawned(existing, existing.pid)
                self._reports.answer_started(existing, waiters)
                self._wake()
            return
        with table.lock:
            if self._lifeline.cut_off():
                # The order came before a stall (the worker was stopped, or cut off): the leader
                # may have given the key to another worker meanwhile. Let it place the key again.
                self._reports.spawn_failed(name, key, sid, "unavailable")
                return
            target = self._resolve(name)
            if target is None:
                self._reports.spawn_failed(name, key, sid, "unknown_name",
                                           msg=f"{self._reports.hostname} does not know {name!r}")
                return
        try:
            c = self._fork_for(target, name, key, args, sid, waiters, start)
        except OSError as exc:
            # No process, fd or memory left for it: this key's start fails, and no other key.
            logger.warning("forseti: could not create a keyed process for %r: %s", key, exc)
            self._reports.spawn_failed(name, key, sid, "resource", type=type(exc).__name__, msg=str(exc))
            return
        with table.lock:
            table.by_key[k] = c
            table.new.append(c)
        self._wake()

    def _fork_for(self, target: Any, name: str, key: str, args: list[Any], sid: str,
                  waiters: list[list[str]], start: Start = _NONE) -> Child:
        """A keyed process for a key no spare was left for: a spare the zygote forks at once and
        is given the key (the worker's threads never wait for a fork), else a fork of the worker.
        :class:`OSError` when a resource ran out (the worker does not try a fork of its own then:
        the zygote lives on, and the worker is in the same cgroup, under the same limits)."""
        if self.zygote is not None and self.zygote.alive and self.zygote.serves(name):
            # (a name registered after a zygote started by exec is forked by the worker)
            try:
                c = self._fork_from_zygote(min(zygote_mod.MAX_BATCH - 1, self._orders.qsize()))
            except EOFError:
                logger.warning("forseti: the zygote has ended; the worker forks keyed processes itself")
            else:
                if self._give(c, name, key, args, sid, waiters, start):
                    return c
                c.process.kill()  # died before its key reached it: reaped below, started afresh
                c.process.join(1.0)
                c.process.close()
                c.conn.close()
        if start.state is not None:  # a spare of its own, given its key with its Assign
            c = self._fork(None, name, key, args, sid)
            if not self._give(c, name, key, args, sid, waiters, start):
                c.process.kill()
                raise OSError(f"the keyed process forked for {key!r} died before it took its key")
            return c
        c = self._fork(target, name, key, args, sid, start.epoch)
        c.waiters = waiters
        return c


def _assign(name: str, key: str, args: list[Any], sid: str, start: Start) -> p.Encoded | dict[str, Any]:
    """The :class:`Assign` of a key: with its start's epoch and sid (its checkpoints' fence) and a
    handoff's state spliced in as the JSON bytes it came as (no worker thread decodes a state)."""
    wire = Assign(name, key, args, None, start.epoch, sid).to_wire()
    if start.state is None:
        return wire
    head = p.encode([wire])
    return p.Encoded(head[:-1] + b',"state":' + start.state + b"}")
