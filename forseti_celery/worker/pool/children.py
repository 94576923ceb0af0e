"""A worker's keyed processes: billiard children it forks, feeds and watches.

Forking happens on a spawner thread that lives as long as the registry
(``PR_SET_PDEATHSIG`` fires when the *thread* that forked exits), so neither the
consumer thread nor the leader on it ever waits for a fork. The spawner keeps a
few *spares* forked ahead (``forseti_spares``): a spare is a keyed process that
has not been given its key yet, so a new key costs a pipe write, not a fork and
a process start; the spawner has the next one forked behind it, and one forked
at once for a key that finds none left, by the worker's
:mod:`~forseti_celery.worker.pool.zygote` where it runs (Linux), else by itself. A watcher
thread polls every child's pipe and exit sentinel: it forwards answers to
callers, reports starts and exits to the leader (through an outbox that is
retried until the broker takes it: exits are never lost), and kills children
that overstay a stop.

No thread of the worker ever waits on a child's pipe: the worker's ends are
non-blocking. What a child has not taken yet waits in its mailbox (bounded by
``forseti_mailbox_limit``) and is written by the watcher as the pipe drains; what
a child writes is read as it comes, a frame at a time once whole, so a child
stopped in the middle of a frame holds up no one else.

No thread of the worker decodes or encodes a payload either (a cast's or call's
message, a reply's value): a frame to a child is made of the lines of the broker
message as they came, a large one as a view of its body, not copied (see
:func:`~forseti_celery.core.protocol.encode_parts`); a child's answer goes into the
reply broker message as the child encoded it.
"""

from __future__ import annotations

import os
import queue
import select
import signal
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import billiard
import billiard.popen_fork
from celery.utils.log import get_logger

from ...child import runtime as child_main
from ...core import protocol as p
from ...core.conf import MAX_TIMEOUT
from ...core.errors import BrokerUnavailable
from . import zygote as zygote_mod

logger = get_logger(__name__)

__all__ = ["Child", "Children"]

Key = tuple[str, str]
Waiter = tuple[str, str]
_Order = tuple[str, str, list[Any], str, list[list[str]]]  # name, key, args, sid, waiters
_REFILL: _Order = ("", "", [], "", [])  # the spawner's cue to fork spares up to the target
_QUIET = 0.01  # seconds without spawns or deliveries before the worker forks a spare itself (one left)
_RETRY_FIRST, _RETRY_MAX = 0.25, 8.0  # seconds before a spare is forked again after a failed fork (doubling)
_READ = select.POLLIN | select.POLLHUP | select.POLLERR
#: A frame on a child's pipe, as billiard's ``Connection.send_bytes`` writes it and ``recv_bytes``
#: (in the child) reads it: a signed 4-byte big-endian length, then that many bytes.
_HEADER = struct.Struct("!i")
_MAX_FRAME = 2**31 - 1
_CHUNK = 65536  # bytes read from a child's pipe at once
_READS = 16  # reads from one child per round at most: one chatty child does not starve the others
_DROPS_LOGGED_EVERY = 10.0  # seconds between two warnings about casts dropped for one process
_BODY = 1024 * 1024  # bytes of answers' values in one broker message at most, but for a single answer


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


def _size(frame: list[p.Chunk]) -> int:
    return sum(map(len, frame))  # a memoryview of bytes has one-byte items: its len is its size


class KeyedChild(billiard.Process):  # type: ignore[misc]
    """A billiard process that skips the parent's after-fork hooks.

    Those hooks tidy up the worker's broker connections and pools, which a keyed
    process never uses; they take locks that another thread of the worker (a task
    on the solo pool, a client) may hold at the instant of the fork, which would
    hang the child forever, and they cost milliseconds of every start.
    """

    def _bootstrap(self) -> int:
        from billiard import process as bp
        from billiard import util

        bp._children = set()
        bp._set_current_process(self)
        util._finalizer_registry.clear()
        code = 1
        try:
            self.run()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            logger.exception("keyed process %s failed", self.name)
        finally:
            util._exit_function()
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (AttributeError, ValueError, OSError):
                    pass
        return code

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _ForkPopen(process_obj)

    def kill(self) -> None:
        """SIGKILL it (billiard 4's Process has no ``kill``)."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class _ForkPopen(billiard.popen_fork.Popen):  # type: ignore[misc]
    """billiard's fork ``Popen``, but a refused ``os.fork`` leaves no fd open: billiard 4.3's
    ``_launch`` opens the exit-sentinel pipe first and keeps both ends when the fork fails (two
    fds lost per refused fork, until the worker runs out of them too)."""

    def _launch(self, process_obj: Any) -> None:
        parent_r, child_w = os.pipe()
        try:
            self.pid = os.fork()
        except OSError:
            os.close(parent_r)
            os.close(child_w)
            raise
        if self.pid == 0:
            code = 1
            try:
                os.close(parent_r)
                code = process_obj._bootstrap()  # (random is reseeded by Python's own at-fork hook)
            finally:
                os._exit(code)
        os.close(child_w)
        self.sentinel = parent_r


@dataclass(eq=False)
class Child:
    """The worker's record of one keyed process."""

    name: str
    key: str
    sid: str
    process: Any
    conn: Any
    started_at: float = field(default_factory=time.time)
    started: bool = False
    messages: int = 0
    init_error: tuple[str, str] | None = None
    reason: str | None = None
    calls: dict[str, str] = field(default_factory=dict)
    last_words: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    stoppers: list[Waiter] = field(default_factory=list)
    kill_at: float | None = None
    gone: bool = False
    conn_fd: int = -1
    #: Callers to answer directly when it has started (``[reply queue, correlation id]``).
    waiters: list[list[str]] = field(default_factory=list)
    #: Forked ahead, waiting for a key (see :class:`Children`).
    spare: bool = False
    #: Its pipe and exit are polled by the watcher (a spare's only once the watcher next runs).
    watched: bool = False
    #: Its mailbox: frames (or their unwritten rest) not taken off the pipe yet, oldest first.
    unsent: deque[p.Chunk] = field(default_factory=deque)
    #: Bytes in :attr:`unsent`, which ``forseti_mailbox_limit`` bounds.
    unsent_bytes: int = 0
    #: The watcher polls the pipe for room to write (the rest of :attr:`unsent`).
    writing: bool = False
    #: Bytes read from the pipe that do not make a whole frame yet.
    partial: bytearray = field(default_factory=bytearray)
    #: Casts dropped for a full mailbox and not logged yet, and when that was last logged.
    dropped: int = 0
    dropped_logged_at: float = -_DROPS_LOGGED_EVERY
    #: The init args of its key (``None`` for a spare): a rebuilt leader gets them back from
    #: :meth:`Children.registry_args`.
    args: list[Any] | None = None
    #: Guards the mailbox fields (taken after ``Children._lock`` where both are held).
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.conn_fd >= 0:
            os.set_blocking(self.conn_fd, False)  # no thread of the worker waits on a child

    @property
    def pid(self) -> int:
        return int(self.process.pid)


class Children:
    """Spawn, deliver to, stop and watch the keyed processes of one worker."""

    def __init__(
        self,
        hostname: str,
        resolve: Callable[[str], Any],
        publish: Callable[[list[tuple[str, list[dict[str, Any]]]]], None],
        leader_rk: str,
        event: Callable[..., None],
        stop_timeout: float,
        fence_after: float,
        heartbeat: float,
        spares: int = 0,
        mailbox_limit: int = 16 * 1024 * 1024,
    ) -> None:
        #: Shared with every child: see :class:`~forseti_celery.child.runtime.Lifeline`.
        self.lifeline = child_main.Lifeline(fence_after, heartbeat / 2)
        self.hostname = hostname
        self._resolve = resolve
        self._publish = publish
        self._leader_rk = leader_rk
        self._event = event
        self._stop_timeout = stop_timeout
        self._mailbox_limit = mailbox_limit
        self._lock = threading.Lock()
        self._by_key: dict[Key, Child] = {}
        self._by_fd: dict[int, tuple[Child, bool]] = {}
        self._new: list[Child] = []
        self._remask: deque[Child] = deque()  # children whose pipe needs polling for room, or no longer
        self._outbox: deque[dict[str, Any]] = deque()
        self._replies: dict[str, list[dict[str, Any]]] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._poller = select.poll()
        self._poller.register(self._wake_r, select.POLLIN)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="forseti-children", daemon=True)
        self._spawns: queue.SimpleQueue[_Order | None] = queue.SimpleQueue()
        self._pending: dict[Key, tuple[str, list[Any]]] = {}  # ordered, not forked yet: key -> (sid, args)
        self._spares: deque[Child] = deque()
        self._spare_target = spares
        self._zygote: zygote_mod.Zygote | None = None
        self._refill_due = False  # watcher thread only
        self._refill_at = 0.0  # spawner thread only: no spare forked before (after a failed fork)
        self._events: list[tuple[str, dict[str, Any]]] = []  # watcher thread only: sent after _flush
        self._busy_at = 0.0  # when the consumer thread last had work for the children
        self._spawn_thread = threading.Thread(target=self._spawner, name="forseti-spawner", daemon=True)
        self._dying: set[Child] = set()  # children asked to stop, with a kill deadline
        self.starts = 0
        self.exits = 0

    def start(self) -> None:
        """Start watching and spawning (and the zygote that forks the spares, where it can run)."""
        if self._spare_target and zygote_mod.available():
            try:
                # From the worker's main thread, before our threads run: the zygote dies with the worker.
                self._zygote = zygote_mod.Zygote(KeyedChild, self.lifeline, self._resolve,
                                                 [self._wake_r, self._wake_w])
                self._poller.register(self._zygote.exit_fd, select.POLLIN)
            except Exception:
                logger.exception("forseti: no zygote; spares are forked by the worker")
                self._zygote = None
        self._thread.start()
        self._spawn_thread.start()
        if self._spare_target:
            self._spawns.put(_REFILL)

    # -- from the consumer thread ---------------------------------------------------------
    def spawn(self, name: str, key: str, args: list[Any], sid: str, waiters: list[list[str]] | None = None) -> None:
        """Start a keyed process for ``(name, key)`` unless one runs here already; ``waiters``
        are answered directly once it has started.

        A spare takes the key at once (a pipe write); otherwise the fork happens on the
        spawner thread, so the consumer thread (and the leader living on it) never waits for one.
        """
        k = (name, key)
        waiters = list(waiters or ())
        self._busy_at = time.monotonic()
        with self._lock:
            if k not in self._by_key and self._assign_spare(name, key, args, sid, waiters):
                return  # the watcher has the next spare forked once this one's answers are out
            self._pending[k] = (sid, args)
        self._spawns.put((name, key, args, sid, waiters))

    def _assign_spare(self, name: str, key: str, args: list[Any], sid: str, waiters: list[list[str]]) -> bool:
        # Under self._lock. Not when cut off: the spawner then answers "unavailable".
        while self._spares and not self.lifeline.cut_off() and self._resolve(name) is not None:
            c = self._spares.popleft()
            if self._give(c, name, key, args, sid, waiters):
                self._by_key[(name, key)] = c
                if not c.watched:
                    self._wake()  # its "started" must not wait for the watcher's next round
                return True
        return False

    def _give(self, c: Child, name: str, key: str, args: list[Any], sid: str, waiters: list[list[str]]) -> bool:
        """Send a spare its key; False if it has died meanwhile (the watcher reaps it)."""
        try:
            with c.lock:
                self._queue(c, p.encode_parts([{"t": "assign", "n": name, "k": key, "a": args}]))
                self._write(c)
        except OSError:
            return False
        c.name, c.key, c.sid, c.args, c.waiters, c.spare = name, key, sid, args, waiters, False
        c.started_at = time.time()
        return True

    def _spawner(self) -> None:
        # Long-lived on purpose: PR_SET_PDEATHSIG fires when the thread that forked exits.
        refill = False
        backoff = _RETRY_FIRST
        while True:
            try:
                order = self._spawns.get(timeout=self._refill_wait() if refill else None)
            except queue.Empty:  # time to fork a spare, unless the worker got busy meanwhile
                if self._refill_wait() > 0:
                    continue
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
            name, key, args, sid, waiters = order
            try:
                self._spawn(name, key, args, sid, waiters)
            except Exception as exc:
                logger.exception("forseti: could not start %r", key)
                self.spawn_failed(name, key, sid, "start", type=type(exc).__name__, msg=str(exc))
            finally:
                with self._lock:
                    if self._pending.get((name, key), ("",))[0] == sid:
                        del self._pending[(name, key)]

    def _refill_wait(self) -> float:
        # Forking here, with a spare still at hand, waits until the worker has been quiet for a
        # moment: a fork holds the interpreter for milliseconds, which would delay the calls that
        # usually follow a start. Asking the zygote costs the worker nothing worth waiting for.
        now = time.monotonic()
        if self._zygote_alive():
            return max(0.0, self._refill_at - now)
        with self._lock:
            at_hand = bool(self._spares)
        return max(0.0, self._refill_at - now, self._busy_at + _QUIET - now if at_hand else 0.0)

    def _fork_spare(self) -> bool:
        """Fork one spare if fewer than the target are ready; True while more are wanted."""
        with self._lock:
            wanted = self._spare_target - len(self._spares)
        if wanted <= 0 or self._stopping.is_set() or self.lifeline.cut_off():
            return False  # (cut off: the next start after we hear the broker again asks anew)
        c = None
        if self._zygote_alive():
            try:
                c = self._fork_from_zygote()
            except EOFError:
                logger.warning("forseti: the zygote has ended; the worker forks keyed processes itself")
        if c is None:
            c = self._fork(None, "spare", "", [], "")
        c.spare = True
        with self._lock:
            self._spares.append(c)
            self._new.append(c)  # watched from the watcher's next round: no wake-up just for it
        return wanted > 1

    def _zygote_alive(self) -> bool:
        return self._zygote is not None and self._zygote.alive

    def _fork_from_zygote(self) -> Child:
        assert self._zygote is not None
        process, fd = self._zygote.fork()
        return Child("spare", "", "", process, billiard.connection.Connection(fd), conn_fd=fd)

    def _fork(self, target: Any, name: str, key: str, args: list[Any], sid: str) -> Child:
        """A fork of the worker; :class:`OSError` if a resource ran out (nothing left open then)."""
        parent_end, child_end = billiard.Pipe(duplex=True)
        with self._lock:
            # The child keeps none of the worker's pipe ends: end-of-file then means "worker gone".
            inherited = [self._wake_r, self._wake_w, parent_end.fileno(),
                         *(c.conn_fd for c in (*self._by_key.values(), *self._spares)),
                         *(self._zygote.fds if self._zygote is not None else ())]
        proc = KeyedChild(
            target=child_main.run, name=f"forseti:{name}",
            args=(child_end, target, key, args, os.getpid(), inherited, self.lifeline, self._resolve),
        )
        try:
            proc.start()
        except OSError:
            parent_end.close()
            raise
        finally:
            child_end.close()
        return Child(name, key, sid, proc, parent_end, conn_fd=parent_end.fileno(),
                     args=args if target is not None else None)

    def _spawn(self, name: str, key: str, args: list[Any], sid: str, waiters: list[list[str]]) -> None:
        k = (name, key)
        with self._lock:
            existing = self._by_key.get(k)
            if existing is not None:
                existing.sid = sid  # the leader's current order names it now
                if not existing.started:
                    existing.waiters.extend(waiters)
            elif self._assign_spare(name, key, args, sid, waiters):
                return
        if existing is not None:
            if existing.started:
                self._report(p.SPAWNED, existing, pid=existing.pid)
                self._answer(existing, waiters)
                self._wake()
            return
        with self._lock:
            if self.lifeline.cut_off():
                # The order came before a stall (the worker was stopped, or cut off): the leader
                # may have given the key to another worker meanwhile. Let it place the key again.
                self.spawn_failed(name, key, sid, "unavailable")
                return
            target = self._resolve(name)
            if target is None:
                self.spawn_failed(name, key, sid, "unknown_name", msg=f"{self.hostname} does not know {name!r}")
                return
        try:
            c = self._fork_for(target, name, key, args, sid, waiters)
        except OSError as exc:
            # No process, fd or memory left for it: this key's start fails, and no other key.
            logger.warning("forseti: could not create a keyed process for %r: %s", key, exc)
            self.spawn_failed(name, key, sid, "resource", type=type(exc).__name__, msg=str(exc))
            return
        with self._lock:
            self._by_key[k] = c
            self._new.append(c)
        self._wake()

    def _fork_for(self, target: Any, name: str, key: str, args: list[Any], sid: str,
                  waiters: list[list[str]]) -> Child:
        """A keyed process for a key no spare was left for: a spare the zygote forks at once and
        is given the key (the worker's threads never wait for a fork), else a fork of the worker.
        :class:`OSError` when a resource ran out (the worker does not try a fork of its own then:
        the zygote lives on, and the worker is in the same cgroup, under the same limits)."""
        if self._zygote_alive():
            try:
                c = self._fork_from_zygote()
            except EOFError:
                logger.warning("forseti: the zygote has ended; the worker forks keyed processes itself")
            else:
                if self._give(c, name, key, args, sid, waiters):
                    return c
                c.process.kill()  # died before its key reached it: reaped below, started afresh
                c.process.join(1.0)
                c.process.close()
                c.conn.close()
        c = self._fork(target, name, key, args, sid)
        c.waiters = waiters
        return c

    def deliver(self, batches: dict[Key, list[dict[str, Any]]]) -> None:
        """Forward casts/calls/stops, grouped per key, each group in one frame; never waits for a
        pipe (see :meth:`_post`). A call its process's mailbox has no room for is answered with
        ``mailbox_full`` at once; a cast is dropped (and logged)."""
        self._busy_at = time.monotonic()
        for k, msgs in batches.items():
            refused: list[dict[str, Any]] = []
            with self._lock:
                c = self._by_key.get(k)
                live = [m for m in msgs if c is not None and not c.gone and m.get("p") in (None, c.pid)]
                dead = [m for m in msgs if m not in live] if len(live) != len(msgs) else []
                if c is not None and live:
                    try:
                        refused = self._post(c, live)
                    except OSError:  # its end is closed: it has exited (the watcher reaps it)
                        dead.extend(live)
                        live = []
                    if refused:
                        live = [m for m in live if not any(m is r for r in refused)]
                    for m in live:
                        if m["t"] == p.CALL:
                            c.calls[m["c"]] = m["r"]
                        elif m["t"] == p.STOP:
                            if "r" in m:
                                c.stoppers.append((m["r"], m["c"]))
                            if c.kill_at is None:
                                c.kill_at = time.monotonic() + self._grace(m.get("grace"))
                                self._dying.add(c)
                    c.messages += len(live)
            for m in dead:
                self._not_there(k, m)
            if refused:
                assert c is not None
                self._mailbox_full(c, refused)
        self._wake()

    def _grace(self, grace: Any) -> float:
        """Seconds a stopped process has to end: a stop's ``grace`` if it is one (a number of
        seconds, finite, 0 to MAX_TIMEOUT: anyone may write a stop, NaN included), else
        forseti_stop_timeout."""
        if type(grace) in (int, float) and 0 <= grace <= MAX_TIMEOUT:
            return float(grace)
        return self._stop_timeout

    def _post(self, c: Child, msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Put ``msgs`` in ``c``'s mailbox and write what its pipe takes now, without waiting
        (under ``self._lock``); the messages the mailbox has no room for are returned, in order.
        Raises OSError if the pipe is closed."""
        refused: list[dict[str, Any]] = []
        frame = p.encode_parts(msgs)
        size = _size(frame)
        with c.lock:
            if c.unsent_bytes + _HEADER.size + size <= self._mailbox_limit \
                    or (len(msgs) == 1 and self._fits(c, size)):
                self._queue(c, frame)
            else:  # one by one: a stop always gets in (a process stuck past its grace is killed)
                for m in msgs:
                    frame = p.encode_parts([m])
                    size = _size(frame)
                    if self._fits(c, size) or (m["t"] == p.STOP and size <= _MAX_FRAME):
                        self._queue(c, frame)
                        self._write(c)  # what the pipe takes is not waiting any more
                    else:
                        refused.append(m)
            self._write(c)
        return refused

    def _fits(self, c: Child, size: int) -> bool:
        """Whether a frame of ``size`` bytes has room in ``c``'s mailbox (a frame of one message
        always, when it is empty: the limit bounds what piles up, not a message's size)."""
        return size <= _MAX_FRAME and (not c.unsent_bytes
                                       or c.unsent_bytes + _HEADER.size + size <= self._mailbox_limit)

    @staticmethod
    def _queue(c: Child, frame: list[p.Chunk]) -> None:
        """Append ``frame`` (its chunks, see :func:`~forseti_celery.core.protocol.encode_parts`) to
        ``c``'s mailbox (under ``c.lock``)."""
        size = _size(frame)
        header = _HEADER.pack(size)
        if len(frame) == 1 and size <= 16384:  # one write for a small frame, no copy of a large one
            c.unsent.append(header + frame[0])
        else:
            c.unsent.append(header)
            c.unsent.extend(frame)
        c.unsent_bytes += _HEADER.size + size

    def _write(self, c: Child) -> None:
        """Write as much of ``c``'s mailbox as its pipe takes now (under ``c.lock``); the watcher
        writes the rest once the pipe has room. Raises OSError if the pipe is closed."""
        unsent = c.unsent
        while unsent:
            chunk = unsent[0]
            try:
                n = os.write(c.conn_fd, chunk)
            except BlockingIOError:
                break
            c.unsent_bytes -= n
            if n < len(chunk):
                unsent[0] = memoryview(chunk)[n:]
                break
            unsent.popleft()
        if bool(unsent) != c.writing:
            c.writing = bool(unsent)
            self._remask.append(c)
            if c.writing:
                self._wake()

    def _mailbox_full(self, c: Child, refused: list[dict[str, Any]]) -> None:
        """Answer the refused calls with ``mailbox_full``; count the dropped casts, logged at most
        every ``_DROPS_LOGGED_EVERY`` seconds per process."""
        waiting = c.unsent_bytes
        for m in refused:
            if m["t"] == p.CALL:
                self._reply(m["r"], {"t": p.REPLY, "c": m["c"], "error": "mailbox_full", "msg": (
                    f"keyed process {c.key!r} ({c.name}, pid {c.pid}) has not taken the {waiting} bytes "
                    f"waiting for it (forseti_mailbox_limit = {self._mailbox_limit}); call not delivered")})
            else:
                c.dropped += 1
        now = time.monotonic()
        if c.dropped and now - c.dropped_logged_at >= _DROPS_LOGGED_EVERY:
            logger.warning("forseti: mailbox of keyed process %r (%s, pid %d) is full (%d bytes not taken, "
                           "forseti_mailbox_limit = %d); %d casts to it dropped", c.key, c.name, c.pid,
                           waiting, self._mailbox_limit, c.dropped)
            c.dropped, c.dropped_logged_at = 0, now

    def _not_there(self, k: Key, m: dict[str, Any]) -> None:
        if m["t"] == p.CALL:
            self._reply(m["r"], {"t": p.REPLY, "c": m["c"], "error": "gone",
                                 "msg": f"keyed process {k[1]!r} ({k[0]}) has exited"})
        elif m["t"] == p.STOP and "r" in m:
            # Already gone: the leader answers once its table has caught up (same queue, in order).
            self._outbox.append({"t": p.EXITED, "n": k[0], "k": k[1], "node": self.hostname,
                                 "pid": None, "stoppers": [[m["r"], m["c"]]]})

    def stop_all(self, reason: str, grace: float) -> bool:
        """Stop every keyed process (``terminate`` runs); True if all exits reached the broker."""
        with self._lock:
            keys = list(self._by_key)
        self.deliver({k: [{"t": p.STOP, "reason": reason, "grace": grace}] for k in keys})
        deadline = time.monotonic() + grace + 3.0
        while time.monotonic() < deadline:
            with self._lock:
                if not self._by_key and not self._outbox:
                    return True
            time.sleep(0.02)
        return False

    def snapshot(self) -> list[Child]:
        """The keyed processes running here now."""
        with self._lock:
            return list(self._by_key.values())

    @property
    def spares(self) -> int:
        """Spares forked and waiting for a key now."""
        with self._lock:
            return len(self._spares)

    def registry(self) -> list[list[Any]]:
        """``[name, key, pid or None while starting, sid]`` of every process here, ordered ones
        not forked yet included: what a node reports to its leader."""
        return self.registry_report()[0]

    def registry_args(self) -> list[list[Any] | None]:
        """The init args of each entry of :meth:`registry` (a list parallel to it), ``None`` where
        unknown: what a rebuilt leader gets back for each key (restarts and handoffs need them).
        Two calls see two moments: :meth:`registry_report` has both lists of one moment."""
        return self.registry_report()[1]

    def registry_report(self) -> tuple[list[list[Any]], list[list[Any] | None]]:
        """:meth:`registry` and :meth:`registry_args` of one moment (parallel lists)."""
        with self._lock:
            procs = [[c.name, c.key, c.pid if c.started else None, c.sid] for c in self._by_key.values()]
            args: list[list[Any] | None] = [c.args for c in self._by_key.values()]
            for (name, key), (sid, a) in self._pending.items():
                if (name, key) not in self._by_key:
                    procs.append([name, key, None, sid])
                    args.append(a)
        return procs, args

    def stop(self) -> None:
        """Stop watching (after :meth:`stop_all`); kills whatever is left, spares included."""
        self._stopping.set()
        self._spawns.put(None)
        self._spawn_thread.join(5)
        with self._lock:
            left = [*self._by_key.values(), *self._spares]
        for c in left:
            c.process.kill()
        if self._zygote is not None:
            self._zygote.stop()
        self._wake()
        self._thread.join(5)

    # -- watcher thread ---------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _watch(self) -> None:
        while not self._stopping.is_set():
            try:
                self._watch_once()
            except Exception:
                logger.exception("forseti: child watcher failed")
                time.sleep(0.1)

    def _watch_once(self) -> None:
        now = time.monotonic()
        with self._lock:
            deadlines = [c.kill_at for c in self._dying if c.kill_at is not None]
        timeout = min([0.25] + [max(0.0, d - now) for d in deadlines])
        for fd, revents in self._poller.poll(timeout * 1000):
            if fd == self._wake_r:
                self._drain_wake()
                continue
            if self._zygote is not None and fd == self._zygote.exit_fd:
                self._zygote.read_exits()
                if not self._zygote.alive:  # ended: its socket is readable (at its end) for good
                    self._poller.unregister(fd)
                continue
            entry = self._by_fd.get(fd)
            if entry is None:
                continue
            c, is_conn = entry
            if not is_conn:
                self._reap(c)
                continue
            if revents & select.POLLOUT:
                self._drain(c)
            if revents & _READ:
                self._read(c)
        if self._new:
            self._watch_new()
        if self._remask:
            self._update_masks()
        self._kill_overdue()
        self._flush()
        if self._events:
            events, self._events = self._events, []
            for type_, fields in events:
                self._event(type_, **fields)
        if self._refill_due:
            # Only now: a fork holds the interpreter for milliseconds, which would delay the answers.
            self._refill_due = False
            self._spawns.put(_REFILL)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._watch_new()

    def _watch_new(self) -> None:
        with self._lock:
            new, self._new = self._new, []
        for c in new:
            with c.lock:
                mask = _READ | (select.POLLOUT if c.writing else 0)
            for fd, is_conn in ((c.conn_fd, True), (c.process.sentinel, False)):
                self._by_fd[fd] = (c, is_conn)
                self._poller.register(fd, mask if is_conn else _READ)
            c.watched = True

    def _update_masks(self) -> None:
        """Poll the pipes whose mailbox has something left for room to write, the others not."""
        while self._remask:
            c = self._remask.popleft()
            if self._by_fd.get(c.conn_fd, (None,))[0] is c:
                with c.lock:
                    self._poller.modify(c.conn_fd, _READ | (select.POLLOUT if c.writing else 0))

    def _drain(self, c: Child) -> None:
        """The pipe has room: write more of ``c``'s mailbox."""
        with c.lock:
            try:
                self._write(c)
            except OSError:  # it has exited: nothing will read the rest (its exit is reaped)
                self._discard_unsent(c)

    def _discard_unsent(self, c: Child) -> None:
        # Under c.lock. Calls among the discarded are answered "gone" once its exit is reaped.
        c.unsent.clear()
        c.unsent_bytes = 0
        if c.writing:
            c.writing = False
            self._remask.append(c)

    def _read(self, c: Child, reads: int = _READS) -> None:
        """Take what ``c`` has written, without waiting: whole frames are handled, the start of
        one it is still writing waits in ``c.partial`` (a child stopped mid-frame blocks no one)."""
        buf = c.partial
        try:
            for _ in range(reads):
                chunk = os.read(c.conn_fd, _CHUNK)
                if not chunk:
                    raise EOFError
                buf += chunk
                if len(chunk) < _CHUNK:
                    break
        except BlockingIOError:
            pass
        except (EOFError, OSError):
            self._unwatch(c.conn_fd)
        start = 0
        while len(buf) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, start)
            end = start + _HEADER.size + size
            if end > len(buf):
                break
            # Envelopes decoded; a reply's value stays a view of buf, forwarded as it is.
            for msg in p.decode(buf, start + _HEADER.size, end, routed=False):
                self._from_child(c, msg)
            start = end
        if start:  # a new buffer for the rest: buf stays whole under the views of it
            c.partial = buf[start:]

    def _from_child(self, c: Child, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind == "reply":
            with self._lock:
                c.calls.pop(msg["c"], None)
            if msg.get("error") == "crash":
                # Answered once the exit is reported: the caller may retry get_key at once.
                c.last_words.append((msg.pop("r"), msg))
            else:
                self._reply(msg.pop("r"), msg)
        elif kind == "started":
            with self._lock:
                c.started = True
                waiters, c.waiters = c.waiters, []
            self.starts += 1
            self._report(p.SPAWNED, c, pid=c.pid)  # published before the answers (see _flush)
            self._answer(c, waiters)
            self._refill_due = self._spare_target > 0
            self._event_later(p.EVENT_STARTED, key=c.key, name=c.name, child_pid=c.pid,
                              startup_ms=round((time.time() - c.started_at) * 1000, 3))
        elif kind == "init_error":
            c.init_error = (msg["type"], msg["msg"])
        elif kind == "exit":
            c.reason = msg["reason"]

    def _reap(self, c: Child) -> None:
        if c.conn_fd in self._by_fd:
            self._read(c, reads=sys.maxsize)  # all it wrote before it ended (its last words)
            self._unwatch(c.conn_fd)
        self._unwatch(c.process.sentinel)
        c.process.join(1.0)
        code = c.process.exitcode
        if isinstance(c.process, zygote_mod.Grandchild):
            c.process.close()
        with self._lock:
            c.gone = True
            self._dying.discard(c)
            if c.spare:
                if c in self._spares:
                    self._spares.remove(c)
                if not self._stopping.is_set():
                    self._spawns.put(_REFILL)
            elif self._by_key.get((c.name, c.key)) is c:
                del self._by_key[(c.name, c.key)]
            calls, c.calls = c.calls, {}
        with c.lock:
            self._discard_unsent(c)
        c.conn.close()
        if c.spare:
            return
        reason = c.reason or (f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}")
        for corr, reply_to in calls.items():
            self._reply(reply_to, {"t": p.REPLY, "c": corr, "error": "gone",
                                   "msg": f"keyed process {c.key!r} exited: {reason}"})
        if not c.started:
            if code == child_main.FENCED and c.init_error is None:
                # Ended itself before init: its worker had stopped hearing the broker. Not the key's fault.
                self.spawn_failed(c.name, c.key, c.sid, "unavailable")
                return
            etype, emsg = c.init_error or ("ProcessExited", f"exited during init: {reason}")
            self.spawn_failed(c.name, c.key, c.sid, "start", type=etype, msg=emsg)
            return
        self.exits += 1
        self._report(p.EXITED, c, pid=c.pid, reason=reason, code=code, stoppers=[list(s) for s in c.stoppers])
        for reply_to, msg in c.last_words:
            self._reply(reply_to, msg)
        self._event_later(p.EVENT_EXITED, key=c.key, name=c.name, child_pid=c.pid, reason=reason, exitcode=code,
                          uptime=round(time.time() - c.started_at, 3))

    def _event_later(self, type_: str, **fields: Any) -> None:
        # Sent once this round's reports and answers are out: the events thread then does not
        # compete with them, and a client that drops a ref on an exit event asks the leader
        # after the exit report is on its queue.
        self._events.append((type_, {"timestamp": time.time(), **fields}))

    def _unwatch(self, fd: int) -> None:
        if self._by_fd.pop(fd, None) is not None:
            self._poller.unregister(fd)

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        with self._lock:
            dying = list(self._dying)
        for c in dying:
            if c.kill_at is not None and now >= c.kill_at and c.process.exitcode is None:
                logger.warning("forseti: keyed process %r (pid %d) ignored stop; killing it", c.key, c.pid)
                c.process.kill()
                c.kill_at = now + 1.0

    def spawn_failed(self, name: str, key: str, sid: str, error: str, **fields: str) -> None:
        """Tell the leader that the start ordered as ``sid`` did not happen (through the outbox:
        retried until the broker takes it). ``unavailable`` has the key placed elsewhere."""
        self._outbox.append({"t": p.SPAWN_FAILED, "n": name, "k": key, "node": self.hostname, "sid": sid,
                             "error": error, **fields})
        self._wake()

    def _answer(self, c: Child, waiters: list[list[str]]) -> None:
        for reply_to, corr in waiters:
            self._reply(reply_to, {"t": p.REPLY, "c": corr, "v": [self.hostname, c.pid]})

    def _report(self, kind: str, c: Child, **fields: Any) -> None:
        self._outbox.append({"t": kind, "n": c.name, "k": c.key, "node": self.hostname, "sid": c.sid, **fields})

    def _reply(self, reply_to: str, msg: dict[str, Any]) -> None:
        with self._lock:
            self._replies.setdefault(reply_to, []).append(msg)

    def _flush(self) -> None:
        # Reports first: a caller told "gone" (or given a new process) may ask the leader at once,
        # and must find the key already freed (or recorded). Published in this order (on Redis,
        # in one round trip).
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
