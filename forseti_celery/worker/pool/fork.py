"""A fork of the worker itself: the billiard process class of a keyed process (and of the zygote).

Used by the spawner thread when there is no zygote (or it has ended), and by the worker's main
thread to fork the zygote. Holds no state.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import billiard
import billiard.popen_fork

from ...child import runtime as child_main
from ...core import compat

__all__ = ["KeyedChild"]


class KeyedChild(billiard.Process):  # type: ignore[misc]
    """A billiard process that skips the parent's after-fork hooks.

    Those hooks tidy up the worker's broker connections and pools, which a keyed
    process never uses; they take locks that another thread of the worker (a task
    on the solo pool, a client) may hold at the instant of the fork, which would
    hang the child forever, and they cost milliseconds of every start.
    """

    def _bootstrap(self) -> int:
        if not compat.billiard_child_start(self):
            return int(super()._bootstrap())  # billiard's own: runs the worker's after-fork hooks
        return child_main.become_keyed(self.run, self.name, at_exit=compat.billiard_child_exit)

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return (_ForkPopen if compat.BILLIARD_BOOTSTRAP.ok() else billiard.popen_fork.Popen)(process_obj)

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
