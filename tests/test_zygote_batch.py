"""The zygote forks a burst of spares for one request (issue 13: a handoff's keys arriving at
once on a worker wait for one wake-up of the zygote, not one per fork)."""

from __future__ import annotations

import signal
from typing import Any

import billiard.connection
import pytest

from forseti_celery import KeyedProcess
from forseti_celery.child import runtime as child_main
from forseti_celery.core import protocol as p
from forseti_celery.core.conf import ChildConfig
from forseti_celery.core.pipe import Assign
from forseti_celery.worker.pool import zygote as zygote_mod
from forseti_celery.worker.pool.fork import KeyedChild

pytestmark = pytest.mark.skipif(not zygote_mod.available(), reason="the zygote needs Linux pidfds")


class Echo(KeyedProcess):
    def handle_call(self, msg: Any) -> Any:
        return msg


#: Each test runs on a zygote forked from this process and on one started by exec (a new
#: interpreter importing this module for ``Echo``).
HOW = pytest.mark.parametrize("how", ["fork", "exec"])


def started(how: str) -> zygote_mod.Zygote:
    if how == "fork":
        return zygote_mod.Zygote(KeyedChild, ChildConfig(), child_main.Lifeline(fence_after=60.0, check_every=0.1),
                                 lambda name: Echo, [])
    ref = zygote_mod.ref_of(Echo)
    assert ref is not None and ref.endswith(":Echo")
    return zygote_mod.Zygote(KeyedChild, ChildConfig(zygote="exec"),
                             child_main.Lifeline(fence_after=60.0, check_every=0.1, mappable=True),
                             lambda name: None, [], refs={"echo": ref})


@HOW
def test_the_zygote_forks_several_spares_in_one_request_each_a_live_keyed_process_of_its_own(how: str) -> None:
    zygote = started(how)
    try:
        got = zygote.fork_many(3)
        assert all(not isinstance(g, OSError) for g in got) and len(got) == 3
        spares = [(g[0], billiard.connection.Connection(g[1])) for g in got if not isinstance(g, OSError)]
        assert len({process.pid for process, _ in spares}) == 3
        for i, (_, conn) in enumerate(spares):
            conn.send_bytes(p.encode([Assign("echo", f"k{i}", [], None, 0, "s").to_wire()]))
            assert p.decode(conn.recv_bytes())[0]["t"] == "started"
        # The zygote answers the next request as before: one spare.
        process, fd = zygote.fork()
        assert process.pid not in {pr.pid for pr, _ in spares}
        for pr, conn in [*spares, (process, billiard.connection.Connection(fd))]:
            pr.kill()
            assert zygote.wait(pr.pid, 5.0) is not None
            pr.close()
            conn.close()
    finally:
        zygote.stop()


@HOW
def test_spares_forked_in_one_request_keep_none_of_each_others_pipe_ends(how: str) -> None:
    """The pairs of a batch are all made before its first fork: each spare must close the others'
    ends, or a spare's death would show no end-of-file to the worker (a sibling holding its end),
    and the worker's end closed would not end it (a sibling holding ours)."""
    zygote = started(how)
    try:
        got = zygote.fork_many(3)
        spares = [(g[0], billiard.connection.Connection(g[1])) for g in got if not isinstance(g, OSError)]
        assert len(spares) == 3
        first, middle, last = spares
        first[0].kill()  # its end of the pair is closed only if no sibling holds it
        assert first[1].poll(10.0)
        with pytest.raises(EOFError):
            first[1].recv_bytes()
        middle[1].close()  # the spare sees end-of-file, and ends, only if no sibling holds our end
        assert zygote.wait(middle[0].pid, 10.0) is not None
        last[1].send_bytes(p.encode([Assign("echo", "k", [], None, 0, "s").to_wire()]))
        assert p.decode(last[1].recv_bytes())[0]["t"] == "started"
        for process, conn in spares:
            process.kill()
            zygote.wait(process.pid, 5.0)
            process.close()
            if conn is not middle[1]:
                conn.close()
    finally:
        zygote.stop()


@HOW
def test_a_zygote_spare_takes_sigchld_as_the_default_again(how: str) -> None:
    """The zygote catches SIGCHLD (its wake-up); a keyed process must not (its own children's
    exits are its code's to wait for): the spare resets it, through the C function."""
    zygote = started(how)
    try:
        process, fd = zygote.fork()
        conn = billiard.connection.Connection(fd)
        conn.send_bytes(p.encode([Assign("echo", "k", [], None, 0, "s").to_wire()]))
        assert p.decode(conn.recv_bytes())[0]["t"] == "started"

        def caught(pid: int) -> int:
            with open(f"/proc/{pid}/status", encoding="ascii") as fh:
                return int(next(line for line in fh if line.startswith("SigCgt:")).split()[1], 16)

        assert caught(zygote.process.pid) & (1 << (signal.SIGCHLD - 1))  # (the zygote's, for contrast)
        assert not caught(process.pid) & (1 << (signal.SIGCHLD - 1))
        process.kill()
        zygote.wait(process.pid, 5.0)
        process.close()
        conn.close()
    finally:
        zygote.stop()
