"""The watcher thread: polls every child's pipe and exit, reads what children write, reaps them.

It forwards answers to callers, reports starts and exits to the leader (through
:class:`~forseti_celery.worker.pool.reports.Reports`, retried until the broker takes them:
exits are never lost), writes the rest of a mailbox as its pipe drains, and kills children
that overstay a stop. A reaped child's mailbox is closed in the same step as its key is freed:
the key-addressed messages it never took wait in :attr:`~forseti_celery.worker.pool.table.Table.untaken`
for the node's consumer thread, which holds them for the key's next incarnation (no more work here).
What a child writes is read as it comes, a frame at a time once whole,
so a child stopped in the middle of a frame holds up no one else. No thread of the worker
decodes a payload: a child's answer is forwarded as the child encoded it. It passivates the
children idle past their name's ``idle_timeout`` (:mod:`~forseti_celery.worker.pool.idle`), and
sleeps until something is due: idle children wake no thread of the worker.

Owners: the poller, the fd map, the events to send and the refill cue are the watcher
thread's; the remask queue is appended to by any thread holding a child's mailbox lock and
emptied here; the wake pipe is written by any thread. What the threads share is in the
:class:`~forseti_celery.worker.pool.table.Table`.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from celery.utils.log import get_logger

from ...child import runtime as child_main
from ...core import protocol as p
from ...core.messages import CORR, REPLY_TO, TYPE, Reply
from ...core.pipe import EXIT, HANDED_OFF, HANDOFF_FAILED, INIT_ERROR, REPLY, STARTED, TOUCH
from ...core.worker_messages import REASON_HANDOFF
from . import zygote as zygote_mod
from .idle import Idle
from .outbox import HEADER, Outbox
from .reports import Reports
from .table import Child, Table, untaken_key_addressed
from .wake import Waker

logger = get_logger(__name__)

__all__ = ["Waker", "Watcher"]

_READ = select.POLLIN | select.POLLHUP | select.POLLERR
_CHUNK = 65536  # bytes read from a child's pipe at once
_READS = 16  # reads from one child per pass at most: one chatty child does not starve the others
_AGAIN = 4  # passes of a round at most: what children wrote meanwhile is read before it publishes
_SOON = 0.25  # seconds to the next round while something waits for one (a report to retry, a new spare)
_QUIET = 5.0  # seconds to the next round with nothing due: everything else wakes the watcher
#: How a keyed process's ``handed_off`` frame begins (:class:`~forseti_celery.core.pipe.HandedOff`
#: alone in its frame): the state after it is kept as the bytes it came as, never decoded here.
_HANDED_OFF = b'{"t":"' + HANDED_OFF.encode() + b'","state":'
#: The largest state handed off, in bytes: it travels in two broker messages (RabbitMQ 4 refuses a
#: message over 16 MiB by default, and a refused report would hold up the reports behind it).
MAX_STATE = 15 * 1024 * 1024


class Watcher:
    """Polls, reads and reaps the keyed processes of one worker on a thread of its own."""

    def __init__(self, table: Table, reports: Reports, wake: Waker, refill: Callable[[], None],
                 spawn_failed: Callable[..., None], event: Callable[..., None], want_spares: bool,
                 stopping: threading.Event, idle: Idle) -> None:
        self._table = table
        self._idle = idle
        self._reports = reports
        self._wake = wake
        self._refill = refill
        self._spawn_failed = spawn_failed
        self._event = event
        self._want_spares = want_spares
        self._stopping = stopping
        self._poller = select.poll()
        self._poller.register(wake.r, select.POLLIN)
        self._by_fd: dict[int, tuple[Child, bool]] = {}
        #: Mailboxes whose pipe needs polling for room, or no longer (see :meth:`on_writing`).
        self._remask: deque[Outbox] = deque()
        self._events: list[tuple[str, dict[str, Any]]] = []  # sent after the round's reports
        self._refill_due = False
        self._zygote: zygote_mod.Zygote | None = None
        self._thread = threading.Thread(target=self._watch, name="forseti-children", daemon=True)
        #: Keyed processes started and exited here (written here, read by anyone).
        self.starts = 0
        self.exits = 0

    def start(self, zygote: zygote_mod.Zygote | None) -> None:
        self._zygote = zygote
        if zygote is not None:
            self._poller.register(zygote.exit_fd, select.POLLIN)
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._wake()
        self._thread.join(timeout)

    def on_writing(self, box: Outbox) -> None:
        """``box`` has something left to write, or no longer (any thread, under its lock)."""
        self._remask.append(box)
        if box.writing:
            self._wake()

    # -- watcher thread ---------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stopping.is_set():
            try:
                self._watch_once()
            except Exception:
                logger.exception("forseti: child watcher failed")
                time.sleep(0.1)

    def _watch_once(self) -> None:
        now = time.monotonic()
        deadlines = []
        if self._table.dying:  # (a hint read without the lock: whoever adds to it wakes this thread)
            with self._table.lock:
                deadlines = [c.kill_at for c in self._table.dying if c.kill_at is not None]
        idle_due = self._idle.next_due()
        if idle_due is not None:
            deadlines.append(idle_due)
        # (``new`` is a hint read without the lock; reports pending: the broker refused the last round)
        longest = _SOON if self._table.new or self._reports.pending else _QUIET
        timeout = min([longest] + [max(0.0, d - now) for d in deadlines])
        read = self._handle(self._poller.poll(timeout * 1000))
        # What children wrote while this round read the others joins it (one broker message per reply
        # queue): asked again without waiting, a few times at most, while any of them has written; only
        # while calls wait for answers (the last answer is not held up by a poll: a system call).
        if read and self._reports.in_flight.waiting:
            for _ in range(_AGAIN):
                if not self._handle(self._poller.poll(0)) or not self._reports.in_flight.waiting:
                    break
        if self._table.new:  # (a hint read without the lock: a child missed now is taken next round)
            self._watch_new()
        if self._remask:
            self._update_masks()
        if idle_due is not None:
            self._idle.passivate_due(time.monotonic())
        if self._table.dying:  # (a hint, as above)
            self._kill_overdue()
        self._reports.flush()
        if self._events:
            events, self._events = self._events, []
            for type_, fields in events:
                self._event(type_, **fields)
        if self._refill_due:
            # Only now: a fork holds the interpreter for milliseconds, which would delay the answers.
            self._refill_due = False
            self._refill()

    def _handle(self, ready: list[tuple[int, int]]) -> int:
        """Act on what :meth:`_watch_once`'s poll found; how many children's pipes were read."""
        read = 0
        for fd, revents in ready:
            if fd == self._wake.r:
                self._wake.drain()
                self._watch_new()
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
                c.outbox.drain()
            if revents & _READ:
                self._read(c)
                read += 1
        return read

    def _watch_new(self) -> None:
        with self._table.lock:
            new, self._table.new = self._table.new, []
        for c in new:
            with c.outbox.lock:
                mask = _READ | (select.POLLOUT if c.outbox.writing else 0)
            for fd, is_conn in ((c.conn_fd, True), (c.process.sentinel, False)):
                self._by_fd[fd] = (c, is_conn)
                self._poller.register(fd, mask if is_conn else _READ)
            c.watched = True

    def _update_masks(self) -> None:
        """Poll the pipes whose mailbox has something left for room to write, the others not."""
        while self._remask:
            box = self._remask.popleft()
            entry = self._by_fd.get(box.fd)
            if entry is not None and entry[0].outbox is box:
                with box.lock:
                    self._poller.modify(box.fd, _READ | (select.POLLOUT if box.writing else 0))

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
        while len(buf) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(buf, start)
            if size < 0:  # no frame billiard writes: nothing after it can be trusted
                self._garbled(c)
                return
            end = start + HEADER.size + size
            if end > len(buf):
                break
            at = start + HEADER.size
            if buf.startswith(_HANDED_OFF, at) and buf.find(b"\n", at, end) < 0:
                self._handed_off(c, bytes(buf[at + len(_HANDED_OFF):end - 1]))
                start = end
                continue
            # Envelopes decoded; a reply's value stays a view of buf, forwarded as it is.
            for msg in p.decode(buf, at, end, routed=False):
                try:
                    self._from_child(c, msg)
                except Exception:  # a malformed message: skipped, the others (its neighbours') go on
                    logger.exception("forseti: keyed process %r (pid %d) wrote a malformed message", c.key, c.pid)
            start = end
        if start:  # a new buffer for the rest: buf stays whole under the views of it
            c.partial = buf[start:]

    def _from_child(self, c: Child, msg: dict[str, Any]) -> None:
        kind = msg[TYPE]
        if kind == REPLY:
            corr, to = msg[CORR], msg.pop(REPLY_TO)
            if type(corr) is not str:
                raise TypeError(f"a reply's correlation id is {type(corr).__name__}")
            with self._table.lock:
                if c.calls.pop(corr, None) is not None:
                    self._reports.in_flight.done += 1
                c.ka_calls.discard(corr)
            if msg.get("error") == "crash":
                # Answered once the exit is reported: the caller may retry get_key at once.
                c.last_words.append((to, msg))
            else:
                self._reports.reply(to, msg)
        elif kind == TOUCH:  # a keep_alive timer fired: activity, for passivation
            with self._table.lock:
                c.active_at = time.monotonic()
        elif kind == STARTED:
            with self._table.lock:
                c.started = True
                waiters, c.waiters = c.waiters, []
            self.starts += 1
            self._reports.spawned(c, c.pid)  # published before the answers (see Reports)
            self._reports.answer_started(c, waiters)
            self._idle.started(c)
            self._refill_due = self._want_spares
            self._event_later(p.EVENT_STARTED, key=c.key, name=c.name, child_pid=c.pid,
                              startup_ms=round((time.time() - c.started_at) * 1000, 3))
            if c.moved_from is not None:  # a handoff's next incarnation: the pause its key saw
                source, since = c.moved_from
                self._event_later(p.EVENT_MOVED, key=c.key, name=c.name, child_pid=c.pid, source=source,
                                  target=self._reports.hostname, pause_ms=round((time.time() - since) * 1000, 3))
        elif kind == INIT_ERROR:
            c.init_error = (msg["type"], msg["msg"])
        elif kind == EXIT:
            c.reason = msg["reason"]
        elif kind == HANDED_OFF:  # (not alone in its frame: its state decoded, written again)
            self._handed_off(c, p.encode([{"v": msg.get("state")}])[len(b'{"v":'):-1])
        elif kind == HANDOFF_FAILED:
            logger.warning("forseti: keyed process %r (%s, pid %d) could not hand off (%s: %s); it ends as in a "
                           "shutdown", c.key, c.name, c.pid, msg.get("type"), msg.get("msg"))

    def _handed_off(self, c: Child, state: bytes) -> None:
        """``c`` answered its handoff with ``state``: kept for its exit report, unless too late."""
        with self._table.lock:
            handing = c.handing
        if handing is None:
            return
        if time.monotonic() > handing.deadline or len(state) > MAX_STATE:
            logger.warning("forseti: keyed process %r (%s, pid %d) took its snapshot past forseti_handoff_timeout, "
                           "or one over %d bytes (%d); it ends as in a shutdown, its state dropped", c.key, c.name,
                           c.pid, MAX_STATE, len(state))
            return
        c.state = state

    def _garbled(self, c: Child) -> None:
        """``c`` wrote what no keyed process writes: not read any more, and killed (reaped as any exit)."""
        logger.error("forseti: keyed process %r (pid %d) wrote a malformed frame; killing it", c.key, c.pid)
        c.partial = bytearray()
        self._unwatch(c.conn_fd)
        if c.process.exitcode is None:
            c.process.kill()

    def _reap(self, c: Child) -> None:
        if c.conn_fd in self._by_fd:
            self._read(c, reads=sys.maxsize)  # all it wrote before it ended (its last words)
            self._unwatch(c.conn_fd)
        self._unwatch(c.process.sentinel)
        # A handoff's process has said how it ends and has ended (its pidfd or sentinel is ready): its
        # exit report (its next incarnation waits for it) does not wait for the zygote's exit status.
        c.process.join(0.0 if c.handing is not None and c.reason else 1.0)
        code = c.process.exitcode
        if isinstance(c.process, zygote_mod.Grandchild):
            c.process.close()
        table = self._table
        with table.lock:
            c.gone = True
            table.dying.discard(c)
            spare = c.spare
            if spare:
                if c in table.spares:
                    table.spares.remove(c)
                if not self._stopping.is_set():
                    self._refill()
            elif table.by_key.get((c.name, c.key)) is c:
                del table.by_key[(c.name, c.key)]
            # Under the lock with the removal: a delivery finds it either with these or gone after them.
            self._reports.in_flight.done += len(c.calls)  # answered here, or the next incarnation's
            untaken = untaken_key_addressed(c, c.outbox.close())
            if untaken:  # the node holds them for the next incarnation, ahead of later arrivals
                table.untaken.setdefault((c.name, c.key), []).extend(untaken)
            calls, c.calls = c.calls, {}
            ka_calls, c.ka_calls = c.ka_calls, set()
            started, stoppers = c.started, [list(s) for s in c.stoppers]
            exit_waiters, c.exit_waiters = c.exit_waiters, []
            handing = c.handing
        c.conn.close()
        if spare:
            return
        self._idle.reaped(c)
        for reply_to, corr in exit_waiters:  # published after this round's reports: its exit's among them
            self._reports.reply(reply_to, Reply.ok(corr, None).to_wire())
        reason = c.reason or (f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}")
        for corr, reply_to in calls.items():
            if corr in ka_calls and started:  # it had taken it: at most once, so never sent again
                answer = Reply.fail(corr, "crash", f"keyed process {c.key!r} exited with the call: {reason}",
                                    "ProcessExited")
            else:
                answer = Reply.fail(corr, "gone", f"keyed process {c.key!r} exited: {reason}")
            self._reports.reply(reply_to, answer.to_wire())
        if not started:
            if code == child_main.FENCED and c.init_error is None:
                # Ended itself before init: its worker had stopped hearing the broker. Not the key's fault.
                self._spawn_failed(c.name, c.key, c.sid, "unavailable")
                return
            etype, emsg = c.init_error or ("ProcessExited", f"exited during init: {reason}")
            self._spawn_failed(c.name, c.key, c.sid, "start", type=etype, msg=emsg)
            return
        self.exits += 1
        if handing is not None and reason == REASON_HANDOFF and c.state is None:
            reason = "shutdown"  # its snapshot came too late (or never): it ended as a shutdown ends it
        self._reports.exited(c, c.pid, reason, code, stoppers, handing if reason == REASON_HANDOFF else None)
        for reply_to, msg in c.last_words:
            self._reports.reply(reply_to, msg)
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
        with self._table.lock:
            overdue = [c for c in self._table.dying if c.kill_at is not None and now >= c.kill_at]
            for c in overdue:
                c.kill_at = now + 1.0
        for c in overdue:
            if c.process.exitcode is None:
                logger.warning("forseti: keyed process %r (pid %d) ignored stop; killing it", c.key, c.pid)
                c.process.kill()
