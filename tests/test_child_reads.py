"""A keyed process reads its pipe on the thread that waits for its next message (no reader thread):
frames cut anywhere read whole and in order; an idle process answers with one thread (or only its
lifeline watcher, which never reads the pipe); a busy one is still fenced; a busy one leaves what
is sent to it in its worker's mailbox, which refuses calls once full while its neighbours answer."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import billiard.connection
import pytest

from forseti_celery import KeyedProcess, MailboxFull, receive
from forseti_celery.child import runtime as child_main
from forseti_celery.child.pipe_end import CHUNK, PipeEnd
from forseti_celery.core import protocol as p
from forseti_celery.core.conf import ChildConfig
from forseti_celery.testing import wait_for
from forseti_celery.worker.pool import zygote as zygote_mod
from forseti_celery.worker.pool.fork import KeyedChild

from .helpers import fresh, harness
from .test_async_process import _answers
from .test_child import _assign, _fork_spare, _kill, _wait_exit
from .test_mailbox import BIG, MAILBOX, PAD, _ask_all, _neighbours

_READ, _CLOCK_NANOSLEEP = 0, 230  # x86-64 system call numbers, as /proc/<pid>/task/<tid>/syscall shows them
needs_x86_64 = pytest.mark.skipif(os.uname().machine != "x86_64", reason="reads x86-64 system call numbers")


class Log(KeyedProcess):
    """Keeps every cast; answers a call with what it has kept; a call {"busy": s} sleeps ``s`` seconds first."""

    def init(self, key: str, *args: Any) -> None:
        self.casts: list[Any] = []

    def handle_cast(self, msg: Any) -> None:
        self.casts.append(msg)

    def handle_call(self, msg: Any) -> Any:
        if isinstance(msg, dict) and "busy" in msg:
            time.sleep(msg["busy"])
        return [msg, list(self.casts)]


def _threads(pid: int) -> dict[int, int]:
    """Thread id -> the system call it is in (-1 when running)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            first = f.read().split()[0]
        out[int(tid)] = -1 if first == "running" else int(first)
    return out


def _waits_in(pid: int, call: int) -> bool:
    return _threads(pid).get(pid) == call


def _frame(*lines: bytes) -> bytes:
    body = b"\n".join(lines)
    return struct.pack("!i", len(body)) + body


def _cast(m: Any) -> bytes:
    return p.encode_message({"t": "cast", "n": "log", "k": "k"}, "message", 2**24, payload=m).data


def _call(corr: str, m: Any) -> bytes:
    return p.encode_message({"t": "call", "n": "log", "k": "k", "r": "r", "c": corr}, "message", 2**24,
                            payload=m).data


def test_frames_cut_anywhere_by_the_writer_are_read_whole_and_in_order() -> None:
    ours, theirs = socket.socketpair()
    big = "y" * (3 * CHUNK)  # a frame longer than one read
    frames = [_frame(_cast(i)) for i in range(50)] + [_frame(_cast(big), _cast("after big"))] + [
        _frame(*(_cast(f"many-{i}") for i in range(20)))]
    data = b"".join(frames)
    cuts = [1, 2, 3, 5, 4097, 4100, 70_000, 140_000, 140_003]  # inside headers, bodies, the big frame

    def write() -> None:
        at = 0
        for cut in [*cuts, len(data)]:
            ours.sendall(data[at:cut])
            at = cut

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    pipe = PipeEnd(theirs)
    got: list[Any] = []
    try:
        while len(got) < 50 + 2 + 20:
            got += [m[p.PAYLOAD] for m in pipe.read()]
        writer.join(10)
        assert got == [*range(50), big, "after big", *(f"many-{i}" for i in range(20))]
        ours.close()
        with pytest.raises(EOFError):
            pipe.read()
    finally:
        ours.close()
        theirs.close()


def test_a_process_takes_the_messages_of_one_frame_in_order_and_answers_each_call() -> None:
    pid, conn = _fork_spare(child_main.Lifeline(fence_after=60.0, check_every=0.1), Log)
    try:
        conn.send_bytes(p.encode([{"t": "assign", "n": "log", "k": "k", "a": []}]))
        assert conn.poll(5) and p.decode(conn.recv_bytes()) == [{"t": "started"}]
        conn.send_bytes(b"\n".join([_cast("a"), _call("c0", 0), _cast("b"), _cast("c"), _call("c1", 1)]))
        answers = _answers(conn, 2)
        assert [(a["c"], p.payload(a)) for a in answers] == [("c0", [0, ["a"]]), ("c1", [1, ["a", "b", "c"]])]
    finally:
        _kill(pid)
        conn.close()


@needs_x86_64
def test_a_process_forked_by_its_worker_has_only_its_lifeline_watcher_besides_which_never_reads_the_pipe() -> None:
    pid, conn = _fork_spare(child_main.Lifeline(fence_after=60.0, check_every=0.1), Log)
    try:
        _assign(conn, "k")
        wait_for(lambda: _waits_in(pid, _READ) or None, 10, 0.01, "never waited in read()")
        threads = _threads(pid)
        assert len(threads) == 2, threads
        (watcher,) = set(threads) - {pid}
        wait_for(lambda: _threads(pid)[watcher] == _CLOCK_NANOSLEEP or None, 10, 0.01, "the watcher reads")
        conn.send_bytes(_call("c", "idle"))
        assert p.payload(_answers(conn, 1)[0]) == ["idle", []]
    finally:
        _kill(pid)
        conn.close()


@needs_x86_64
def test_a_process_busy_in_its_callback_is_fenced_by_its_lifeline_watcher() -> None:
    lifeline = child_main.Lifeline(fence_after=0.6, check_every=0.1)
    pid, conn = _fork_spare(lifeline, Log)
    try:
        _assign(conn, "k")
        conn.send_bytes(_call("c", {"busy": 60}))
        wait_for(lambda: _waits_in(pid, _CLOCK_NANOSLEEP) or None, 10, 0.01, "never got busy")
        # The worker stops hearing the broker now: no more lifeline.heard(); the callback sleeps on.
        assert _wait_exit(pid, 30.0) == child_main.FENCED
    finally:
        _kill(pid)
        conn.close()


@needs_x86_64
@pytest.mark.skipif(not zygote_mod.available(), reason="the zygote needs Linux pidfds")
@pytest.mark.parametrize("target", ["sync", "async", "async-awaits"])
def test_an_idle_process_forked_by_the_zygote_has_one_thread_and_answers_when_called(target: str) -> None:
    from tests.async_app import AsyncIdle, Ordered, SyncIdle

    cls = {"sync": SyncIdle, "async": AsyncIdle, "async-awaits": Ordered}[target]
    zygote = zygote_mod.Zygote(KeyedChild, ChildConfig(), child_main.Lifeline(60.0, 0.1), lambda name: cls, [])
    try:
        process, fd = zygote.fork()
        conn = billiard.connection.Connection(fd)
        conn.send_bytes(p.encode([{"t": "assign", "n": "x", "k": "k", "a": []}]))
        assert conn.poll(5) and p.decode(conn.recv_bytes()) == [{"t": "started"}]
        for round_ in range(3):
            # idle: its one thread waits for the pipe (async-awaits: in its loop's epoll_wait)
            wait_for(lambda: _waits_in(process.pid, -1) is False or None, 10, 0.01)
            assert len(_threads(process.pid)) == 1, _threads(process.pid)
            msg = ["a", round_, 0.0] if target == "async-awaits" else round_
            conn.send_bytes(_call(f"c{round_}", msg))
            answer = _answers(conn, 1)[0]
            assert answer["c"] == f"c{round_}" and "error" not in answer, answer
        assert len(_threads(process.pid)) == 1
        conn.close()
        assert zygote.wait(process.pid, 10.0) == 1  # end-of-file on its pipe ends it
        process.close()
    finally:
        zygote.stop()


def _function(key: str) -> None:
    """Function form: one wait that times out, one with no timeout, then the casts it receives until
    "end"; it exits saying what it got."""
    got = [receive(timeout=0.05), receive(timeout=None)]  # the test sends nothing until the second waits
    while (msg := receive(timeout=5.0)) != "end":
        got.append(msg)
    raise SystemExit(",".join(map(str, got)))


@needs_x86_64
def test_a_function_form_process_receives_with_and_without_a_timeout_from_its_own_reads() -> None:
    pid, conn = _fork_spare(child_main.Lifeline(fence_after=60.0, check_every=0.1), _function)  # type: ignore[arg-type]
    try:
        _assign(conn, "k")
        wait_for(lambda: _waits_in(pid, _READ) or None, 10, 0.01, "never got past its first receive")
        conn.send_bytes(b"\n".join([_cast("a"), _cast("b")]))
        conn.send_bytes(b"\n".join([_cast("c"), _cast("end")]))
        assert _wait_exit(pid, 10.0) == 0
        got: list[Any] = []
        while conn.poll(1):
            try:
                got += p.decode(conn.recv_bytes())
            except EOFError:
                break
        assert got[-1] == {"t": "exit", "reason": "exit 'None,a,b,c'"}, got
    finally:
        _kill(pid)
        conn.close()


def test_a_process_busy_in_python_leaves_its_messages_in_its_workers_mailbox_which_refuses_calls_once_full(
    broker_url: str, tmp_path: Path
) -> None:
    with harness(broker_url, tmp_path, n=1, FORSETI_MAILBOX_LIMIT=str(MAILBOX)) as h:
        busy = h.forseti.get_key(fresh("busy"))  # a counter: {"sleep": s} keeps it busy in Python
        neighbours = _neighbours(h)
        node, pid = busy
        assert {ref.node for ref in neighbours} == {node}
        slept: list[Any] = []
        caller = threading.Thread(target=lambda: slept.append(busy.call({"sleep": 8}, timeout=60)), daemon=True)
        caller.start()
        wait_for(lambda: _waits_in(pid, _CLOCK_NANOSLEEP) or None, 10, 0.01, "never got busy")
        for i in range(40):  # 4 MB: the pipe and the mailbox take about 1.3 MB of it
            busy.send([i, PAD])
        with pytest.raises(MailboxFull, match="forseti_mailbox_limit"):
            busy.call(BIG, timeout=5)
        latencies: list[float] = []
        _ask_all(neighbours, latencies)  # its neighbours answer meanwhile
        assert _waits_in(pid, _CLOCK_NANOSLEEP)  # and it is still busy
        caller.join(60)
        assert slept == ["slept"]
        seen: list[Any] = wait_for(lambda: _seen(busy), 20, 0.05, "never took what waited")  # type: ignore[arg-type,return-value]
        assert MAILBOX // len(PAD) <= len(seen) < 40
        assert [m[0] for m in seen] == list(range(len(seen)))  # the first sends, in order


def _seen(ref: Any) -> list[Any] | None:
    try:
        return ref.call("seen", timeout=5)  # type: ignore[no-any-return]
    except MailboxFull:
        return None
