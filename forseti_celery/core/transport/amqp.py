"""RabbitMQ (kombu's ``amqp`` transport): what forseti does differently there.

The broker does the work Redis needs forseti for: it delivers the leader queue to a single
active consumer (``x-single-active-consumer``), deletes a queue left without consumers
(``x-expires``), drops a message unconsumed past its ``expiration``, and holds a backlog back
behind a consumer's prefetch window. Every declarer of a queue must pass identical arguments
(RabbitMQ answers 406 otherwise): they are built here only.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import amqp.exceptions

from .. import compat

__all__ = ["batch", "buffer_reads", "connection_errors", "declare", "list_ttl", "name", "needs_declaring",
           "pipelines", "prefetch_windows", "prepare", "queue_arguments", "reader", "single_active_consumer"]

name = "amqp"
single_active_consumer = True
prefetch_windows = True
#: Publishes are not answered one by one (no publisher confirms): a pipeline would save nothing.
pipelines = False
#: What py-amqp raises for a lost connection or channel (besides ``OSError``).
connection_errors: tuple[type[BaseException], ...] = (amqp.exceptions.ConnectionError,
                                                      amqp.exceptions.ChannelError)


def queue_arguments(*, single_active_consumer: bool = False, expires: float | None = None) -> dict[str, Any] | None:
    """``x-single-active-consumer`` and/or ``x-expires`` (milliseconds)."""
    args: dict[str, Any] = {}
    if single_active_consumer:
        args["x-single-active-consumer"] = True
    if expires is not None:
        args["x-expires"] = int(expires * 1000)
    return args or None


def list_ttl(keep: float | None, expiration: float | None) -> None:
    """None: RabbitMQ expires queues (``x-expires``) and messages (``expiration``) itself."""
    return None


def prepare(channel: Any) -> None:
    """Nothing to prepare."""


def needs_declaring(queue: Any) -> bool:
    """Every queue: RabbitMQ drops what is routed to a queue that does not exist."""
    return True


def declare(channel: Any, queues: Iterable[Any], *, consumer: bool = False) -> None:
    """Declare ``queues`` (and their bindings) on ``channel`` without waiting for each answer
    (``nowait``): RabbitMQ handles a channel's frames in order, so a publish or a ``basic_consume``
    sent after them on the same channel finds them declared, and a refusal closes the channel, which
    that ``basic_consume`` (waiting for its answer) or the publisher's next use reports."""
    for queue in queues:
        bound = queue.bind(channel)
        if bound.no_declare:
            continue
        # What Queue.declare(nowait=True) does, but for the exchanges of its bindings too (which
        # kombu declares waiting for each answer).
        if bound.exchange is not None and bound.exchange.name:
            bound.exchange.declare(nowait=True)
        bound.queue_declare(nowait=True)
        if bound.exchange is not None and bound.exchange.name:
            bound.queue_bind(nowait=True)
        for b in bound.bindings:
            if b.exchange is not None and b.exchange.name:
                b.exchange(channel).declare(nowait=True)
            b.bind(bound, nowait=True, channel=channel)


class _Plain:
    def keep_at_least(self, routing_key: str, ttl: float) -> None:
        return None


def batch(channel: Any) -> AbstractContextManager[_Plain]:
    """Each publish goes out as it is made, in order."""
    return nullcontext(_Plain())


#: Bytes asked of the socket at once by a consumer's reads (:func:`buffer_reads`): a small message's
#: three frames (about 100 bytes and its body) in one ``recv``; small enough that taking a frame off
#: the front of what was read (a copy of the rest) stays cheap.
READ_AHEAD = 4096
_RETRY = (errno.EAGAIN, errno.EINTR)
_READABLE = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | select.POLLNVAL


class _Timeout:
    """py-amqp's ``having_timeout(timeout)`` for a transport whose reads :func:`buffer_reads` made:
    the timeout becomes a deadline those reads poll for, instead of the socket's own timeout (py-amqp
    sets it and sets it back around every frame: two ``ioctl`` each, six for the smallest message).
    The socket stays as py-amqp leaves it between reads, blocking, for its writes."""

    __slots__ = ("deadline", "readable", "sock_of")

    def __init__(self, sock_of: Callable[[], Any]) -> None:
        self.sock_of = sock_of
        self.deadline: float | None = None  # monotonic; None: no timeout (the socket's own, if any)
        #: The socket polled readable just before (:func:`reader`): the next read asks it at once.
        self.readable = False

    def __call__(self, timeout: float | None) -> _Timeout:
        self.deadline = None if timeout is None else time.monotonic() + timeout
        return self

    def __enter__(self) -> Any:
        return self.sock_of()

    def __exit__(self, *exc: object) -> None:
        self.deadline = None


def buffer_reads(connection: Any) -> bool:
    """Make py-amqp's reads on ``connection`` (a kombu ``Connection``, connected) take what the
    socket holds, up to :data:`READ_AHEAD` bytes, instead of exactly the bytes asked for, and wait
    for them by polling the socket up to the read's timeout, never changing the socket's. True if
    they do; False for any other transport (TLS, Redis) or with the guard off.

    py-amqp reads each frame in three ``recv`` calls of the exact sizes (its header, its payload,
    its end octet), each after a ``poll`` while the socket has a timeout, as a consumer's
    ``drain_events(timeout)`` gives it: nine of each for the smallest message (method, header and
    body frames), and it sets the socket's timeout before each frame and sets it back after (six
    ``ioctl``). Read ahead, the three frames come in one ``poll`` and one ``recv``: draining a
    backlog of small messages took 19 µs of the consumer thread's CPU per message instead of 33
    here. Frames, their order and what a timeout keeps (the bytes read so far, in
    ``_read_buffer``) are as py-amqp's own ``TCPTransport._read`` has them; only a consumer's
    connection, whose socket nothing else polls, may read ahead (Celery's event loop polls its own).
    """
    transport: Any = getattr(getattr(connection, "connection", None), "transport", None)
    if not compat.py_amqp_read_ahead_allowed(transport):
        return False
    recv = transport._quick_recv
    poller = select.poll()
    poller.register(transport.sock.fileno(), _READABLE)
    timeout = _Timeout(lambda: transport.sock)

    def _wait() -> bool:
        """Poll until the socket is readable or the deadline (without one: the socket's own timeout)."""
        deadline = timeout.deadline
        if deadline is None:
            wait = transport.sock.gettimeout()
            return bool(poller.poll(None if wait is None else wait * 1000))
        return bool(poller.poll(max(0.0, deadline - time.monotonic()) * 1000))

    def _read(n: int, initial: bool = False) -> bytes:  # TCPTransport._read's signature
        rbuf = transport._read_buffer
        try:
            # A message's first frame is waited for (polled first, unless the caller just did); the
            # rest of one is there, mostly.
            ready, timeout.readable = not initial or timeout.readable, False
            while len(rbuf) < n:
                if not ready and not _wait():
                    raise TimeoutError()
                try:
                    s = recv(max(n - len(rbuf), READ_AHEAD), socket.MSG_DONTWAIT)
                except OSError as exc:
                    if exc.errno in _RETRY:
                        if exc.errno == errno.EINTR and initial and transport.raise_on_initial_eintr:
                            raise TimeoutError() from None
                        ready = False
                        continue
                    raise
                if not s:
                    raise OSError("Server unexpectedly closed connection")
                rbuf += s
                ready = True
        except BaseException:
            transport._read_buffer = rbuf
            raise
        result, transport._read_buffer = rbuf[:n], rbuf[n:]
        return result  # type: ignore[no-any-return]

    transport._read = _read
    transport.having_timeout = timeout
    return True


#: Seconds py-amqp may wait for the rest of a message once its socket polled readable (a frame
#: split across segments, a heartbeat frame alone).
FRAME_WAIT = 0.01


def reader(connection: Any, wake_fd: int, clear: Callable[[], None]) -> Callable[[float], None]:
    """A wait for messages on ``connection`` (a kombu ``Connection`` whose reads :func:`buffer_reads`
    made) that ``wake_fd`` readable ends too (``clear()`` empties it), for a consumer's work that
    another thread may take over (:class:`~forseti_celery.core.baton.Baton`).

    It polls the socket and ``wake_fd`` itself, unless bytes read ahead wait in py-amqp's buffer
    already, then has py-amqp read what came (``drain_events``: one message, its callbacks run)
    and send a heartbeat if one is due, as ``ConsumerLoop`` does after each wait.
    """
    transport = connection.connection.transport
    sock_fd = transport.sock.fileno()
    poll = select.poll()
    poll.register(sock_fd, select.POLLIN)
    poll.register(wake_fd, select.POLLIN)

    having: Any = transport.having_timeout
    hint = isinstance(having, _Timeout)

    def read(timeout: float) -> None:
        if not transport._read_buffer:
            data = False
            for fd, _ in poll.poll(timeout * 1000):
                if fd == sock_fd:
                    data = True
                else:
                    clear()
            if not data:
                connection.heartbeat_check()
                return
            if hint:
                having.readable = True
        try:
            connection.drain_events(timeout=FRAME_WAIT)
        except TimeoutError:
            pass
        connection.heartbeat_check()

    return read
