"""What ties a keyed process to its worker's life: the :class:`Lifeline` (when the worker last
heard the broker, in shared memory) and :func:`detach` (right after the fork: signals, death
with the parent, the parent's descriptors closed). A keyed process never outlives its worker,
nor keeps its key once the worker may have lost it.
"""

from __future__ import annotations

import _thread
import ctypes
import mmap
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import billiard.sharedctypes
from celery.utils.log import get_logger

logger = get_logger(__name__)

__all__ = ["FENCED", "Lifeline", "become_keyed", "detach"]

_PR_SET_PDEATHSIG = 1
try:  # resolved once in the worker, so a new child does not load libc again
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the pipe's end-of-file still ends a child
    _prctl = None
#: Exit code of a keyed process that ended itself because its worker stopped hearing the broker.
FENCED = 2


class Lifeline:
    """When the worker last heard the broker (``time.monotonic()``), in memory shared with its
    children: a keyed process whose worker is cut off, hung or stopped (SIGSTOP) for longer
    than ``fence_after`` ends before the leader may start its key elsewhere. The worker's zygote
    looks every ``check_every`` seconds (half a heartbeat: well inside the two heartbeats between
    ``fence_after`` and the leader's ``node_timeout``) and kills its children when it is cut off;
    a keyed process the worker forked itself looks as often on its own (:meth:`watch`)."""

    def __init__(self, fence_after: float, check_every: float, *, mappable: bool = False) -> None:
        self.fence_after = fence_after
        self.check_every = min(check_every, fence_after / 4)
        #: With ``mappable``: a memfd holding the value, for a process that is no fork of this one
        #: (a zygote started by exec, see :meth:`attach`); ``None`` otherwise.
        self.fd: int | None = None
        self._heard: Any
        if mappable:
            self.fd = os.memfd_create("forseti-lifeline", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, ctypes.sizeof(ctypes.c_double))
            self._heard = _mapped(self.fd)
            self._heard.value = time.monotonic()
        else:
            self._heard = billiard.sharedctypes.RawValue("d", time.monotonic())

    @classmethod
    def attach(cls, fd: int, fence_after: float, check_every: float) -> Lifeline:
        """The lifeline a worker made ``mappable``, in another process that was given its
        :attr:`fd` (the fd is closed here; the mapping stays, and is inherited by forks)."""
        lifeline = cls.__new__(cls)
        lifeline.fence_after, lifeline.check_every, lifeline.fd = fence_after, check_every, None
        lifeline._heard = _mapped(fd)
        os.close(fd)
        return lifeline

    def heard(self, when: float) -> None:
        """The worker heard the broker at ``when`` (called in the worker)."""
        self._heard.value = when

    def close(self) -> None:
        """Close the memfd (the mapping stays): once nothing will start a process that needs it."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def cut_off(self) -> bool:
        """Whether the worker has not heard the broker for too long (asked in the child)."""
        return time.monotonic() - float(self._heard.value) > self.fence_after

    def watch(self) -> None:
        """In a keyed process the worker forked itself (no zygote looks for it): a thread that
        ends the process (:data:`FENCED`) within ``check_every`` of its worker being cut off,
        however long its callback runs. It never touches the pipe. A bare thread, as
        ``threading.Thread``'s bookkeeping would copy some 80 shared pages into the process."""
        _thread.start_new_thread(self._watch, ())

    def _watch(self) -> None:
        while True:
            time.sleep(self.check_every)
            if self.cut_off():
                os._exit(FENCED)  # fenced: our key may be given to another worker soon


def _mapped(fd: int) -> Any:
    """A ``double`` in a shared mapping of ``fd`` (``CLOCK_MONOTONIC`` is one clock for every
    process of the machine, so the worker's ``time.monotonic()`` means the same in the other)."""
    return ctypes.c_double.from_buffer(mmap.mmap(fd, ctypes.sizeof(ctypes.c_double)))


def detach(parent_pid: int, close_fds: Iterable[int], signals: bool = True) -> None:
    """Right after a fork from ``parent_pid``: default signal handling (unless ``signals`` is
    False: inherited from a parent that has it already), die with the parent, close ``close_fds``
    (the parent's ends of pipes and sockets)."""
    # Celery's handlers were inherited and do nothing outside the worker's main
    # process; a keyed process must die on SIGTERM. SIGINT (a terminal's ^C) goes
    # to the whole process group: the worker stops its children itself.
    if signals:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                    signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass


def become_keyed(body: Callable[[], None], name: str, at_exit: Callable[[], None] | None = None) -> int:
    """A freshly forked process becomes a keyed process: runs ``body`` (:func:`~.runtime.run`, as the
    worker or its zygote calls it) and returns the exit code the process ends with, for either
    forker to ``os._exit`` with: ``body``'s ``sys.exit`` code, 1 for a failure (logged), else 0.
    ``at_exit`` runs last (billiard's finalizers, for a fork of the worker); the standard streams
    are flushed, as the process ends without the interpreter's own exit."""
    code = 1
    try:
        body()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        logger.exception("keyed process %s failed", name)
    finally:
        if at_exit is not None:
            at_exit()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, ValueError, OSError):
                pass
    return code
