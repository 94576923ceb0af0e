"""A consumer loop's reading work lent to callers (issue 15): the methods of
:class:`~forseti_celery.core.consumer.ConsumerLoop` by which a client's callers read their own
answers on their threads, and those by which the loop thread lends them its work.

The work is a role one thread holds at a time (:class:`.baton.Baton`). A sync caller waiting for its
answer takes it over and does the loop's steps until its answer is handled (:meth:`LentReads.drive`);
an event loop takes the free work for single reads that never wait (:meth:`LentReads.answer_socket`,
:meth:`LentReads.read_free`); either hands a failure it meets to the loop thread, which reconnects.
The loop thread reads with a wait its baton's wake-up fd ends (``_reader``) and leaves the work free
once it has handed a sync caller its answer (:meth:`LentReads.answered`, ``_release``).

What the loop is (connecting, reconnecting, consuming, acknowledging, ticking, the step these
methods repeat) is :mod:`.consumer`'s. A mixin, not an object of its own: these are the loop's
methods, called directly, on the loop's state (listed on :class:`LentReads`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from kombu import Connection

from . import transport
from .baton import Baton
from .transport import redis_consume

__all__ = ["LentReads"]


class LentReads:
    """The callers' reads of a :class:`~forseti_celery.core.consumer.ConsumerLoop` (its mixin)."""

    # The loop's state these methods use (set by ConsumerLoop; see there).
    _baton: Baton | None
    _stopping: threading.Event
    _busy: Callable[[], bool] | None
    _awaited: Callable[[], bool]
    _answered: bool
    _fast: redis_consume.RedisConsumer | None
    _lost: BaseException | None
    _step: Callable[[float], None]  # the loop's one step: the tick if due, then one wait for messages

    # -- from the callers' threads (and the handler, on the holder's) -----------------
    def answered(self) -> None:
        """A sync caller's answer was just handed over (by the handler, on the holder's thread): if
        the loop thread did it, it leaves its work free after this read (:meth:`.baton.Baton.release`),
        so that caller's next request, back within :data:`.baton.LINGER`, reads its own answer
        without waking this thread (a new client's second request among them, issue 15)."""
        self._answered = True

    def call_back(self) -> None:
        """Have the loop thread take its work back from the callers soon (an async caller's
        answer is awaited); nothing if it holds it (or it is no client's)."""
        if self._baton is not None:
            self._baton.call_back()

    def drive(self, done: Callable[[], bool], until: float) -> None:
        """Do the loop's work on the calling thread (a caller waiting for an answer) until
        ``done()``, ``until`` (monotonic) or a failure; returns at once when it cannot (another
        caller drives, the loop's reads are not set up, or it is no client's). A lost connection is the
        loop thread's to reconnect: it takes the work back at once."""
        baton = self._baton
        if baton is None or done() or not baton.take(until):
            return
        resume = True
        try:
            while not done() and not self._stopping.is_set() and time.monotonic() < until:
                self._step(until)
            resume = self._stopping.is_set() or (self._busy is not None and self._busy())
        except Exception as exc:
            self._lost = exc
        except BaseException:  # interrupted mid-read: the connection's state is unknown
            self._lost = ConnectionAbortedError("a caller reading the connection was interrupted")
            raise
        finally:
            baton.give_back(resume)

    def answer_socket(self) -> Any | None:
        """The socket a client's lists' messages (its answers) come on while the loop's work is
        free (Redis's fast path only), for an event loop to watch (:mod:`forseti_celery.client.aio`);
        None otherwise. Unlocked: :meth:`read_free` checks it again."""
        fast, baton = self._fast, self._baton
        if fast is None or baton is None or not baton.free:
            return None
        return fast.socket

    def read_free(self, sock: Any, whole: Callable[[Any], bool]) -> bool | None:
        """Read what has come without waiting, on the calling thread, if the loop's work is free
        (an event loop reading its own answers, :mod:`forseti_celery.client.aio`): a ``BRPOP`` sent
        if none is out, what came handed over as the loop thread would. Then whether a ``BRPOP``
        is out (False: it took an answer, call again for the next). None, nothing read, when the
        work is held, ``sock`` is no longer :meth:`answer_socket`'s, or ``whole(sock)`` is false
        (an answer not all in: the loop thread takes the work back and reads it, waiting)."""
        baton = self._baton
        if baton is None or not baton.take_free():
            return None
        resume = True
        try:
            fast = self._fast
            if fast is None or fast.socket is not sock or self._stopping.is_set() or not whole(sock):
                return None
            fast.drain(0.0)
            resume = False
            return fast.popping
        except Exception as exc:
            self._lost = exc
            return None
        except BaseException:
            self._lost = ConnectionAbortedError("a caller reading the connection was interrupted")
            raise
        finally:
            baton.give_back(resume)

    # -- called from the loop thread only ----------------------------------------------
    def _release(self, baton: Baton) -> bool:
        """Leave the work free after handing a sync caller its answer and park (True), unless an
        answer is still awaited (False: read on). Checked again once free: an async caller's
        ``call_back`` meanwhile found it held, so the loop thread reads on at once."""
        if self._awaited():
            return False
        baton.release()
        if self._awaited():
            baton.call_back()
        return True

    def _reader(self, conn: Connection, fast: redis_consume.RedisConsumer | None,
                buffered: bool) -> Callable[[float], None] | None:
        """One wait for messages, which the baton's wake-up fd ends (None: it cannot be woken)."""
        baton = self._baton
        if fast is not None:
            if baton is not None:
                fast.wake_on(baton.wake_fd, baton.clear)
            return fast.drain
        if baton is None or not buffered:
            return None
        return transport.amqp.reader(conn, baton.wake_fd, baton.clear)
