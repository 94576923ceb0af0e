"""An event loop reading its own answers while the client's consumer work is free (issue 15, row 17c).

A sync caller reads its own answer (:class:`~forseti_celery.core.baton.Baton`: it takes the
consumer's work over, the reply thread parks) and gives the work back, free, for
:data:`~forseti_celery.core.baton.LINGER`. An ``acall`` made then used to call the reply thread
back (a thread woken) to read its answer, which then woke the loop (a second one). Here the loop
watches the connection its answers come on instead (``add_reader``, Redis's fast path), and when
it is readable takes the free work for one read that never waits
(:meth:`~forseti_celery.core.consumer.ConsumerLoop.read_free`): the answer is read and handed over
on the loop, as a sync caller's is on its thread.

The loop never holds the work between two of its callbacks: the work stays free, so a sync caller
takes it as before, and a loop that blocks (a sync call inside a coroutine, CPU work) holds nothing
up: the reply thread takes the work back after ``LINGER`` as it would anyway. The loop stops
watching, and calls the reply thread back, when a read finds the work held (the reply thread took
it back, a caller or another loop reads), the connection replaced, or an answer not all in the
socket yet (:func:`whole_reply`: that one the reply thread reads, waiting for the rest); and when
no request of this loop awaits an answer any more, or more than one does (the reply thread's reads
then run on another core beside the loop's work, which makes a loop's throughput). The watched
descriptor is a ``dup`` of the connection's, so a number the connection closes (a reconnection)
and the system reuses is never one this loop polls.

Only the ``BRPOP`` connection's reply is checked whole before a read; the fanout connection (exit
events), polled by the same ``drain``, is read by redis-py's non-blocking ``parse_response``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import weakref
from typing import Any

from ..core.consumer import ConsumerLoop

__all__ = ["LoopReads", "whole_reply"]

#: Bytes peeked at most to find where an answer ends: a larger one is read by the reply thread.
PEEK = 65536
_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT


def reply_end(buf: bytes) -> int:
    """Where the first RESP reply in ``buf`` ends (RESP2 and RESP3), -1 if it is not all there;
    ``ValueError`` if it is no RESP."""
    pos, todo, size = 0, 1, len(buf)
    while todo:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return -1
        kind, count = buf[pos], buf[pos + 1:end]
        todo -= 1
        pos = end + 2
        if kind in b"*~>%":  # aggregates (a map's entries count twice)
            n = int(count) * (2 if kind == 37 else 1)
            todo += max(0, n)
        elif kind in b"$=!":  # bulk strings: their bytes and CRLF follow
            n = int(count)
            if n >= 0:
                pos += n + 2
        elif kind not in b"+-:_,#(":
            raise ValueError(f"not a RESP type: {kind!r}")
        if pos > size:
            return -1
    return pos


def whole_reply(sock: Any) -> bool:
    """Whether a read of ``sock`` (a Redis connection with at most one answer coming) waits for
    nothing: no byte in, or a whole reply (peeked, not read)."""
    try:
        buf = sock.recv(PEEK, _FLAGS)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False  # the reply thread's read finds the error and reconnects
    if not buf:
        return False  # closed by the server: the reply thread's read finds out
    try:
        return reply_end(buf) >= 0
    except ValueError:  # not RESP: the reply thread's read raises the protocol error
        return False


class LoopReads:
    """One event loop's reads of its own answers (the loop thread's only, but :meth:`close`)."""

    __slots__ = ("__weakref__", "_again_at", "_awaiting", "_consumer", "_fd", "_finalizer", "_sock", "_watching",
                 "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._consumer: ConsumerLoop | None = None
        self._awaiting = 0  # requests of this loop awaiting an answer
        self._sock: Any = None  # the connection's socket the dup below is of
        self._fd = -1  # its dup, kept while that socket is the live one
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._watching = False  # _fd is registered on the loop
        self._again_at: asyncio.Handle | None = None  # a read scheduled to send the next BRPOP

    def awaiting(self, consumer: ConsumerLoop) -> bool:
        """One more request of this loop awaits an answer from ``consumer``: True if this loop
        reads it (watching), False if the reply thread must be called back for it (the work is
        not free, or more than one request of this loop awaits: then the reply thread's reads,
        on another core, beside this loop's work, make the throughput)."""
        self._awaiting += 1
        if self._watching:
            if self._awaiting == 1:
                return True
            self._unwatch()
            return False
        if self._awaiting > 1:
            return False
        sock = consumer.answer_socket()
        if sock is None:
            return False
        if sock is not self._sock:
            self.close()
            try:
                fd = os.dup(sock.fileno())
            except (OSError, ValueError):  # closed meanwhile
                return False
            self._sock, self._fd, self._consumer = sock, fd, consumer
            self._finalizer = weakref.finalize(self, os.close, fd)
        try:
            self.loop.add_reader(self._fd, self._readable)
        except (OSError, ValueError, RuntimeError):
            return False
        self._watching = True
        self._again_at = self.loop.call_soon(self._again)  # after this iteration's flush: a BRPOP out
        return True

    @property
    def busy(self) -> bool:
        """Whether a request of this loop awaits an answer."""
        return self._awaiting > 0

    def answered(self) -> None:
        """A request of this loop no longer awaits (answered, failed, timed out or cancelled)."""
        self._awaiting -= 1
        if self._awaiting <= 0 and self._watching:
            self._unwatch()

    def _again(self) -> None:
        self._again_at = None
        self._readable()

    def _readable(self) -> None:
        consumer = self._consumer
        popping = None if consumer is None else consumer.read_free(self._sock, whole_reply)
        if popping is not None:
            if not popping and self._again_at is None:  # an answer taken: the next BRPOP out for what
                self._again_at = self.loop.call_soon(self._again)  # else awaits, once the tasks it
            return  # answered ran (the last stops the watch, and this)
        self._unwatch()
        if consumer is not None:
            consumer.call_back()  # the reply thread reads what this loop's requests await

    def _unwatch(self) -> None:
        self._watching = False
        if self._again_at is not None:
            self._again_at.cancel()
            self._again_at = None
        try:
            self.loop.remove_reader(self._fd)
        except (OSError, ValueError, RuntimeError):  # the loop is closed
            pass

    def close(self) -> None:
        """Stop watching and close the dup (another socket, or this loop is done with)."""
        if self._watching:
            self._unwatch()
        finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer()
        self._sock, self._fd = None, -1
