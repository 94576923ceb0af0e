"""The consumer loop's work as a role held by one thread at a time (leader/follower, issue 15).

A :class:`~forseti_celery.core.consumer.ConsumerLoop` reads its connections, hands over what
comes and runs its tick; normally on its own thread. A client's sync caller that has sent a
request and must wait for its answer takes that work over instead (:meth:`Baton.take`), reads
until its own answer is handled (handing every other one over as the loop thread would), and gives
it back (:meth:`Baton.give_back`): its answer costs no wake-up of another thread.

The loop thread, asked for the role while it waits for messages, is woken through :attr:`wake_fd`
(polled beside its connections), hands the role over and stays parked while callers keep
coming: it takes it back once the role has been free for :data:`LINGER` seconds, or at once when
a caller leaves answers awaited by others (:meth:`give_back` with ``resume``), a tick is due,
or the loop must stop or reconnect. One holder at a time: every field the loop's work touches is
the holder's. The loop thread that has handed a waiting sync caller its answer leaves the role free
the same way (:meth:`Baton.release`): that caller's next request finds it free.
"""

from __future__ import annotations

import os
import threading
import time

from . import forks

__all__ = ["LINGER", "LOOK", "Baton"]

#: Seconds the role stays free after a caller gave it back before the loop thread takes it again:
#: a caller calling again meanwhile takes it without waking anyone.
LINGER = 0.005
#: Seconds between the parked loop thread's looks while a caller holds the role (its wake-ups cost
#: the callers' CPU): what comes unasked (an exit event) waits that long at most while the role is
#: free, not while a caller reads.
LOOK = 0.02

_LOOP, _CALLER, _FREE = "loop", "caller", "free"


class Baton:
    """Who holds a consumer loop's work: its thread, a caller, or nobody (between callers)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._holder = _LOOP  # under _mutex
        self._enabled = False  # connected and drivable by callers (under _mutex)
        self._wanted = False  # a caller waits for the loop thread to hand the role over (under _mutex)
        self._granted = threading.Lock()  # released by the loop thread once for the wanting caller
        self._granted.acquire()
        self._resume = threading.Event()  # the loop thread is asked back
        self._freed_at = 0.0  # the last caller gave the role back (under _mutex)
        self._asked = False  # the loop thread is wanted back once the caller holding the role is done
        eventfd = getattr(os, "eventfd", None)
        if eventfd is not None:
            fd = eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.wake_fd, self._wake_w = fd, fd
        else:  # pragma: no cover - no eventfd (not Linux): a pipe
            self.wake_fd, self._wake_w = os.pipe()
            os.set_blocking(self.wake_fd, False)
            os.set_blocking(self._wake_w, False)
        self._forks = forks.count()  # the wake-up fds are this process's (a forked child's are its parent's)
        self._closed = False  # the fds (under _mutex)

    @property
    def wanted(self) -> bool:
        """A caller waits for the loop thread to hand the role over (read by the loop thread)."""
        return self._wanted

    def close(self) -> None:
        """Close the wake-up fds (the loop is over): written no more (their numbers may be reused)."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            for fd in {self.wake_fd, self._wake_w}:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _poke(self) -> None:
        """Make the wake-up fd readable (under ``_mutex``; not once closed, nor in a forked child:
        ``forks.count``, one comparison where ``os.getpid`` is a system call per poke)."""
        if not self._closed and forks.count() == self._forks:
            try:
                os.write(self._wake_w, b"\1\0\0\0\0\0\0\0")
            except OSError:  # full (a pipe): readable already
                pass

    # -- the loop thread ----------------------------------------------------------------------
    def enable(self, on: bool) -> None:
        """Connected (callers may drive) or not (they wait for the loop thread); the loop thread's."""
        with self._mutex:
            self._enabled = on
            if not on and self._wanted:  # the caller waiting for it waits on its answer instead
                self._wanted = False
                self._granted.release()

    def hand_over(self) -> bool:
        """Give the role to the caller waiting for it (the loop thread, holding it); False if it
        gave up waiting meanwhile."""
        with self._mutex:
            if not self._wanted:
                return False
            self._wanted = False
            self._holder = _CALLER
            self._granted.release()
            return True

    def release(self) -> None:
        """Leave the role free, as a caller giving it back does (the loop thread, holding it, has
        just handed a sync caller its answer: that caller's next request, the second of a new
        client among them, then reads its own answer without waking anyone); handed over at once
        to a caller waiting for it."""
        with self._mutex:
            if self._wanted:
                self._wanted = False
                self._holder = _CALLER
                self._granted.release()
                return
            self._holder = _FREE
            self._freed_at = time.monotonic()

    def park(self, due: float, stopping: threading.Event) -> None:
        """Wait, the role handed over, until the loop thread should hold it again: free for
        :data:`LINGER`, asked back, ``due`` (monotonic) reached, or ``stopping`` (once free)."""
        while True:
            with self._mutex:
                holder = self._holder
                now = time.monotonic()
                if holder != _CALLER and (self._resume.is_set() or self._asked or stopping.is_set()
                                          or now >= due or now - self._freed_at >= LINGER):
                    self._holder = _LOOP
                    self._asked = False
                    self._resume.clear()
                    return
                self._resume.clear()
                wait = LOOK if holder == _CALLER else self._freed_at + LINGER - now
            self._resume.wait(max(0.0005, min(wait, due - now)))

    # -- callers --------------------------------------------------------------------------------
    def take(self, until: float) -> bool:
        """Take the role, waiting for the loop thread to hand it over until ``until`` (monotonic) at
        most; False when another caller holds it, the loop is not connected, or the time is up."""
        with self._mutex:
            if not self._enabled or self._wanted or self._holder == _CALLER:
                return False
            if self._holder == _FREE:
                self._holder = _CALLER
                return True
            self._wanted = True
            self._poke()
        got = self._granted.acquire(timeout=min(max(0.0, until - time.monotonic()), threading.TIMEOUT_MAX))
        with self._mutex:
            if not got:
                if self._wanted:  # not handed over: never will be
                    self._wanted = False
                    return False
                self._granted.acquire(blocking=False)  # handed over (or refused) meanwhile: released for us
            return self._holder == _CALLER and self._enabled

    def take_free(self) -> bool:
        """Take the role only if it is free (given back, the loop thread parked): no waiting, no
        wake-up. For one read that never blocks (an event loop reading its own answers,
        ``ConsumerLoop.read_free``), given back at once."""
        with self._mutex:
            if not self._enabled or self._wanted or self._holder != _FREE:
                return False
            self._holder = _CALLER
            return True

    @property
    def free(self) -> bool:
        """The role is free (unlocked: a hint, :meth:`take_free` decides)."""
        return self._holder == _FREE

    def give_back(self, resume: bool) -> None:
        """Give the role back (the caller holding it); ``resume``: the loop thread takes it at
        once (others await answers, the loop must reconnect or stop), else after :data:`LINGER`."""
        with self._mutex:
            self._holder = _FREE
            self._freed_at = time.monotonic()
            resume = resume or self._asked
        if resume:
            self._resume.set()

    def call_back(self) -> None:
        """Have the loop thread read again soon: at once if the role is free, once the caller
        holding it gives it back otherwise (an answer is awaited that no sync caller reads for)."""
        if self._holder == _LOOP:  # the common case, unlocked: the loop thread reads already
            return
        with self._mutex:
            if self._holder == _LOOP:
                return
            self._asked = True
            if self._holder == _FREE:
                self._resume.set()

    def wake(self) -> None:
        """End the wait of whoever holds the role and waits for messages, and a parked loop thread's."""
        self._resume.set()
        with self._mutex:
            self._poke()

    def clear(self) -> None:
        """Empty the wake-up fd (it polled readable)."""
        try:
            os.read(self.wake_fd, 4096)
        except OSError:
            pass
