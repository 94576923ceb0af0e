"""The baton's wake-up fd is written only by the process that made it (a forked child shares its
parent's fds, and must not wake its parent's loop thread), told by the fork counter
(``core.forks``) rather than by ``os.getpid``, a system call per poke (issue 15)."""

from __future__ import annotations

import os

import pytest

from forseti_celery.core.baton import Baton


def _readable(fd: int) -> bool:
    try:
        os.read(fd, 8)
    except BlockingIOError:
        return False
    return True


def test_a_poke_wakes_the_loop_without_asking_the_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    baton = Baton()
    try:
        def no_getpid() -> int:
            raise AssertionError("os.getpid called on the poke's path")

        monkeypatch.setattr(os, "getpid", no_getpid)
        baton.wake()
        monkeypatch.undo()
        assert _readable(baton.wake_fd)
    finally:
        baton.close()


def test_a_forked_child_never_wakes_its_parents_loop() -> None:
    baton = Baton()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                baton.wake()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not _readable(baton.wake_fd)
        baton.wake()  # the parent's still does
        assert _readable(baton.wake_fd)
    finally:
        baton.close()
