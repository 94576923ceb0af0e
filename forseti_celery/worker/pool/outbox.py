"""A keyed process's mailbox on the worker's side: the frames it has not taken off its pipe yet.

No thread of the worker ever waits on a child's pipe: the worker's end is non-blocking. What a
child has not taken yet waits here, bounded by ``forseti_mailbox_limit``: the consumer thread
puts frames in (:meth:`Outbox.post`; the watcher only an idle process's stop, see
:mod:`~forseti_celery.worker.pool.idle`) and writes what the pipe takes at once; the watcher
writes the rest as the pipe drains (:meth:`Outbox.drain`). A frame is made of the lines of the broker
message as they came, a large one as a view of its body, not copied (see
:func:`~forseti_celery.core.protocol.encode_parts`).

A frame any byte of which is in the pipe counts as taken, with every message in it (the process
reads a frame whole: it takes all of them or none, and the worker cannot tell which); the
messages of the frames none of whose bytes were written are given back when the process has
exited (:meth:`Outbox.close`): the key-addressed ones go to the key's next incarnation
(:mod:`~forseti_celery.worker.forwarding`).

Every field of an :class:`Outbox` but the drop count is read and written under its
:attr:`~Outbox.lock` (taken after the pool's table lock where both are held); the drop count
and when it was last logged belong to the consumer thread (:func:`refuse`).
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from celery.utils.log import get_logger

from ...core import protocol as p
from ...core.messages import CALL, CORR, REPLY_TO, STOP, TYPE, Reply
from ...core.pipe import HANDOFF

logger = get_logger(__name__)

__all__ = ["HEADER", "Closed", "Outbox", "refuse"]

#: A frame on a child's pipe, as billiard's ``Connection.send_bytes`` writes it and ``recv_bytes``
#: (in the child) reads it: a signed 4-byte big-endian length, then that many bytes.
HEADER = struct.Struct("!i")
_MAX_FRAME = 2**31 - 1
_ALWAYS = (STOP, HANDOFF)  # what a full mailbox still takes: it ends the process
_DROPS_LOGGED_EVERY = 10.0  # seconds between two warnings about casts dropped for one process


def _size(frame: list[p.Chunk]) -> int:
    return sum(map(len, frame))  # a memoryview of bytes has one-byte items: its len is its size


class Closed(BrokenPipeError):
    """Raised when a message is put in the mailbox of a process that has exited; ``refused`` are
    those of the delivery neither written nor kept (no room before that was found, or all of them
    once it is closed)."""

    def __init__(self, refused: list[dict[str, Any]]) -> None:
        super().__init__("its keyed process has exited")
        self.refused = refused


class Outbox:
    """The frames (or their unwritten rest) waiting for one child's pipe, oldest first.

    ``on_writing`` is called (under :attr:`lock`) whenever :attr:`writing` changes: the watcher
    then polls the pipe for room to write, or no longer.
    """

    def __init__(self, fd: int, limit: int, on_writing: Callable[[Outbox], None]) -> None:
        os.set_blocking(fd, False)  # no thread of the worker waits on a child
        self.fd = fd
        self.limit = limit
        self._on_writing = on_writing
        self.lock = threading.Lock()
        self.unsent: deque[p.Chunk] = deque()
        #: ``[bytes not written, its messages or None once part of it is written]`` of each frame
        #: in :attr:`unsent`, oldest first.
        self.frames: deque[list[Any]] = deque()
        #: The messages of frames never written, taken out as it exited (see :meth:`close`).
        self.untaken: list[dict[str, Any]] = []
        #: It has exited: nothing is put in any more.
        self.closed = False
        #: Bytes in :attr:`unsent`, which ``forseti_mailbox_limit`` bounds.
        self.unsent_bytes = 0
        #: The watcher polls the pipe for room to write (the rest of :attr:`unsent`).
        self.writing = False
        #: Casts dropped for a full mailbox and not logged yet, and when that was last logged
        #: (consumer thread only).
        self.dropped = 0
        self.dropped_logged_at = -_DROPS_LOGGED_EVERY

    def send(self, msgs: list[dict[str, Any] | p.Encoded]) -> None:
        """Put ``msgs`` in, in one frame whatever the limit, and write what the pipe takes now
        (a spare's key). Raises OSError if the pipe is closed."""
        with self.lock:
            frame = p.encode_parts(msgs)
            self._queue(frame, _size(frame), [m for m in msgs if isinstance(m, dict)])
            self._write()

    def post(self, msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Put ``msgs`` in and write what the pipe takes now, without waiting; the messages there
        is no room for are returned, in order. Raises :class:`Closed` if the pipe is closed."""
        refused: list[dict[str, Any]] = []
        frame = p.encode_parts(msgs)
        size = _size(frame)
        with self.lock:
            if self.closed:
                raise Closed(msgs)  # none of them put in
            if self.unsent_bytes + HEADER.size + size <= self.limit or (len(msgs) == 1 and self._fits(size)):
                self._queue(frame, size, msgs)
            else:  # one by one: a stop (or handoff) always gets in (a process stuck past its grace is killed)
                broken = False
                for m in msgs:
                    frame = p.encode_parts([m])
                    size = _size(frame)
                    if self._fits(size) or ((broken or m[TYPE] in _ALWAYS) and size <= _MAX_FRAME):
                        self._queue(frame, size, [m])  # once it is broken: never written, given back by close
                        if not broken:
                            try:
                                self._write()  # what the pipe takes is not waiting any more
                            except OSError:
                                broken = True
                    else:
                        refused.append(m)
                if broken:
                    raise Closed(refused)
            try:
                self._write()
            except OSError:
                raise Closed(refused) from None
        return refused

    def drain(self) -> None:
        """The pipe has room: write more (watcher thread)."""
        with self.lock:
            try:
                self._write()
            except OSError:  # it has exited: nothing will read the rest (its exit is reaped)
                self._close()

    def close(self) -> list[dict[str, Any]]:
        """It has exited: nothing is put in any more, what is left is dropped, and the messages of
        the frames never written (not taken: see the module docstring) are returned, in order,
        once. Under the table's lock where the caller holds it (the consumer thread's delivery,
        the watcher's reap)."""
        with self.lock:
            self._close()
            untaken, self.untaken = self.untaken, []
        return untaken

    def _close(self) -> None:
        self.closed = True
        for _, msgs in self.frames:
            if msgs is not None:
                self.untaken.extend(msgs)
        self.frames.clear()
        self.unsent.clear()
        self.unsent_bytes = 0
        if self.writing:
            self.writing = False
            self._on_writing(self)

    def _fits(self, size: int) -> bool:
        """Whether a frame of ``size`` bytes has room (a frame of one message always, when the
        mailbox is empty: the limit bounds what piles up, not a message's size)."""
        return size <= _MAX_FRAME and (not self.unsent_bytes or self.unsent_bytes + HEADER.size + size <= self.limit)

    def _queue(self, frame: list[p.Chunk], size: int, msgs: list[dict[str, Any]]) -> None:
        self.frames.append([HEADER.size + size, msgs])
        header = HEADER.pack(size)
        if len(frame) == 1 and size <= 16384:  # one write for a small frame, no copy of a large one
            self.unsent.append(header + frame[0])
        else:
            self.unsent.append(header)
            self.unsent.extend(frame)
        self.unsent_bytes += HEADER.size + size

    def _write(self) -> None:
        """Write as much as the pipe takes now; the watcher writes the rest once the pipe has
        room. Raises OSError if the pipe is closed."""
        unsent = self.unsent
        while unsent:
            chunk = unsent[0]
            try:
                n = os.write(self.fd, chunk)
            except BlockingIOError:
                break
            self.unsent_bytes -= n
            self._written(n)
            if n < len(chunk):
                unsent[0] = memoryview(chunk)[n:]
                break
            unsent.popleft()
        if bool(unsent) != self.writing:
            self.writing = bool(unsent)
            self._on_writing(self)

    def _written(self, n: int) -> None:
        """``n`` more bytes are in the pipe: the frames they end are gone, the one they start taken."""
        frames = self.frames
        while n:
            f = frames[0]
            if n < f[0]:
                f[0] -= n
                f[1] = None  # part of it is in the pipe: taken (see the module docstring)
                return
            n -= f[0]
            frames.popleft()


def refuse(box: Outbox, key: str, name: str, pid: int, refused: list[dict[str, Any]],
           reply: Callable[[str, dict[str, Any]], None]) -> None:
    """The mailbox of keyed process ``key`` (``name``, ``pid``) had no room for ``refused``
    (consumer thread): the calls are answered ``mailbox_full``, the casts counted as dropped and
    logged at most every ``_DROPS_LOGGED_EVERY`` seconds per process."""
    waiting = box.unsent_bytes
    for m in refused:
        if m[TYPE] == CALL:
            reply(m[REPLY_TO], Reply.fail(m[CORR], "mailbox_full", (
                f"keyed process {key!r} ({name}, pid {pid}) has not taken the {waiting} bytes "
                f"waiting for it (forseti_mailbox_limit = {box.limit}); call not delivered")).to_wire())
        else:
            box.dropped += 1
    now = time.monotonic()
    if box.dropped and now - box.dropped_logged_at >= _DROPS_LOGGED_EVERY:
        logger.warning("forseti: mailbox of keyed process %r (%s, pid %d) is full (%d bytes not taken, "
                       "forseti_mailbox_limit = %d); %d casts to it dropped", key, name, pid,
                       waiting, box.limit, box.dropped)
        box.dropped, box.dropped_logged_at = 0, now
