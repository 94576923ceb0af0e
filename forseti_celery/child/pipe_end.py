"""A keyed process's end of the pipe to its worker: whole frames read by the thread that waits
for its next message, frames written; no thread of its own.

A frame is billiard's (``Connection.send_bytes``, as the worker's outbox writes it): a signed
4-byte big-endian length, then the lines of its messages. :meth:`PipeEnd.read` takes what the
pipe holds in one read (a frame or many) and, when that read ends inside a frame, the rest of it
at once (a frame is read whole: the worker counts one any byte of which is in the pipe as taken).
What a busy process has not read stays in the pipe and in the worker's bounded mailbox
(``forseti_mailbox_limit``), not in the process's memory.

A process whose main thread may wait here while another thread has to wake it (an async one
whose loop another thread may build, :mod:`.aio`) gets a *waker* (:meth:`PipeEnd.waking`), an
eventfd its waits poll along with the pipe.
"""

from __future__ import annotations

import math
import os
import select
import struct
from typing import Any

from ..core.codec import decode_line
from ..core.protocol import Message, decode, decode_payloads

__all__ = ["CHUNK", "PipeEnd"]

_HEADER = struct.Struct("!i")
#: Bytes asked of the pipe by one read: many small frames at once, a large one's first part.
CHUNK = 65536
#: Below this size a frame's header and body leave in one write of one buffer (billiard's bound too).
_JOINED = 16384


class PipeEnd:
    """The child's end of its pipe, over ``conn`` (a billiard ``Connection``, kept: it owns the
    descriptor). Used by the process's main thread only, but for :meth:`wake`."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.fd: int = conn.fileno()
        self._poller: Any = None  # select.poll, built on the first wait with a timeout
        self._waker = -1  # eventfd (or a pipe's read end) that another thread writes to wake a wait
        self._waker_w = -1

    # -- reading ----------------------------------------------------------------------------------
    def read(self) -> list[Message]:
        """The messages of the frames the pipe holds, in order, payloads decoded: one read (which
        waits until the pipe holds something), and the rest of a frame it ended in. Raises
        :class:`EOFError` once the worker has closed its end."""
        fd = self.fd
        data = os.read(fd, CHUNK)
        end = len(data)
        if not end:
            raise EOFError("the worker has closed the pipe")
        batch: list[Message] = []
        at = 0
        raw = False  # a message whose payload decode_payloads has to decode
        while at < end:
            if end - at < 4:  # a header cut by the read
                data = data[at:] + self._exactly(4 - (end - at))
                at, end = 0, 4
            size = _HEADER.unpack_from(data, at)[0]
            at += 4
            if end - at >= size:
                # A frame of one message (a call, as a caller waits for each answer) is decoded whole
                # at once, payload included; any other, as any frame is (see decode_line).
                msg = decode_line(data, at, at + size)
                if msg is not None:
                    batch.append(msg)
                else:
                    batch += decode(data, at, at + size, routed=False)
                    raw = True
                at += size
                continue
            body = bytearray(size)  # the rest of this frame is in the pipe, or on its way: read it now
            body[:end - at] = memoryview(data)[at:end]
            self._fill(memoryview(body)[end - at:])
            batch += decode(body, routed=False)
            raw = True
            break
        if raw:
            decode_payloads(batch)  # a payload decode_line decoded is no Raw: left as it is
        return batch

    def _exactly(self, n: int) -> bytes:
        buf = bytearray(n)
        self._fill(memoryview(buf))
        return bytes(buf)

    def _fill(self, view: memoryview) -> None:
        fd = self.fd
        while view:
            n = os.readv(fd, [view])
            if not n:
                raise EOFError("the worker closed the pipe inside a frame")
            view = view[n:]

    def wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (``None``: no limit; 0: not at all) until the pipe can be
        read or the waker is woken; whether the pipe can be read (end-of-file included)."""
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            if self._waker >= 0:
                poller.register(self._waker, select.POLLIN)
        ready = False
        for fd, _ in poller.poll(-1 if timeout is None else math.ceil(max(timeout, 0.0) * 1000)):
            if fd == self.fd:
                ready = True
            else:
                self._drain_waker()
        return ready

    # -- waking the thread that waits ------------------------------------------------------------
    @property
    def waking(self) -> bool:
        """Whether another thread may wake a wait (:meth:`waking_on` was called)."""
        return self._waker >= 0

    def waking_on(self) -> None:
        """From now on another thread may wake a wait (:meth:`wake`): one descriptor more."""
        if self._waker >= 0:
            return
        if hasattr(os, "eventfd"):
            self._waker = self._waker_w = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        else:  # pragma: no cover - not Linux
            self._waker, self._waker_w = os.pipe()
            os.set_blocking(self._waker, False)
            os.set_blocking(self._waker_w, False)
        if self._poller is not None:
            self._poller.register(self._waker, select.POLLIN)

    def waking_off(self) -> None:
        """No more :meth:`wake`: the waker's descriptors closed."""
        if self._waker < 0:
            return
        if self._poller is not None:
            self._poller.unregister(self._waker)
        for fd in {self._waker, self._waker_w}:
            os.close(fd)
        self._waker = self._waker_w = -1

    def wake(self) -> None:
        """Wake the wait (from any thread); nothing unless :meth:`waking_on` was called (and
        :meth:`waking_off` not yet: the process is ending)."""
        fd = self._waker_w
        if fd < 0:
            return
        try:
            os.write(fd, (1).to_bytes(8, "little"))
        except OSError:  # woken many times already (once is enough), or closed meanwhile
            pass

    def _drain_waker(self) -> None:
        try:
            os.read(self._waker, 8)
        except BlockingIOError:
            pass

    # -- writing ----------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Write ``data`` as one frame (blocks while the pipe is full: the worker reads as it comes)."""
        fd, size = self.fd, len(data)
        if size < _JOINED:
            frame = _HEADER.pack(size) + data
            n = os.write(fd, frame)
            if n == len(frame):
                return
        else:
            n = os.writev(fd, [_HEADER.pack(size), data])
            if n == size + 4:
                return
            frame = _HEADER.pack(size) + data  # rare (a signal, a full pipe): the rest from a copy
        view = memoryview(frame)
        while n < len(view):
            n += os.write(fd, view[n:])
