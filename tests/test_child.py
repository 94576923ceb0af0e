"""The lifeline, in real forked processes: a keyed process ends once its worker is cut off."""

from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Any

import billiard
import billiard.connection
import pytest

from forseti_celery import KeyedProcess
from forseti_celery.child import runtime as child_main
from forseti_celery.core import protocol as p
from forseti_celery.core.conf import ChildConfig
from forseti_celery.testing import wait_for
from forseti_celery.worker.pool import zygote as zygote_mod
from forseti_celery.worker.pool.fork import KeyedChild

from .helpers import pool_with_answers


class Sink(KeyedProcess):
    """Takes casts and does nothing with them; answers a call with its message."""

    def handle_cast(self, msg: Any) -> None:
        pass

    def handle_call(self, msg: Any) -> Any:
        return msg


def _fork_spare(lifeline: child_main.Lifeline, target: type[KeyedProcess] = Sink) -> tuple[int, Any]:
    """A spare keyed process (as a zygote forks them) and the parent's end of its pipe."""
    ours, theirs = billiard.Pipe(duplex=True)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            ours.close()
            child_main.run(theirs, ChildConfig(), lifeline, lambda name: target, parent, [])
            code = 0
        finally:
            os._exit(code)
    theirs.close()
    return pid, ours


def _assign(conn: Any, key: str) -> None:
    """Give the spare at the other end of ``conn`` its key, as a worker does, and see it start."""
    conn.send_bytes(p.encode([{"t": "assign", "n": "sink", "k": key, "a": []}]))
    assert conn.poll(5) and p.decode(conn.recv_bytes()) == [{"t": "started"}]


def _wait_exit(pid: int, timeout: float) -> int | None:
    """Its exit code once it has ended (reaped), ``None`` if it still runs after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def _kill(pid: int) -> None:
    """End it if a failed test left it running (never a pid reaped already: it may be reused)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return
    if not done:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_a_keyed_process_ends_itself_once_its_worker_is_cut_off_even_under_a_stream_of_messages() -> None:
    lifeline = child_main.Lifeline(fence_after=0.6, check_every=0.1)
    pid, conn = _fork_spare(lifeline)
    try:
        _assign(conn, "k1")
        stop = threading.Event()

        def feed() -> None:  # faster than the lifeline is checked: the pipe never stays quiet
            while not stop.is_set():
                try:
                    conn.send_bytes(p.encode([{"t": "cast", "n": "sink", "k": "k", "m": "x"}]))
                except OSError:
                    return
                time.sleep(0.02)

        # The worker stops hearing the broker now: no more lifeline.heard().
        lifeline.heard(time.monotonic())
        cut = time.monotonic()
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        code = _wait_exit(pid, 5.0)
        stop.set()
        feeder.join(2)
        assert code == child_main.FENCED
        assert time.monotonic() - cut < lifeline.fence_after + 1.0
    finally:
        _kill(pid)
        conn.close()


def test_a_keyed_process_lives_on_while_its_worker_hears_the_broker() -> None:
    lifeline = child_main.Lifeline(fence_after=0.6, check_every=0.1)
    pid, conn = _fork_spare(lifeline)
    try:
        _assign(conn, "k2")
        end = time.monotonic() + 1.5  # well past fence_after
        while time.monotonic() < end:
            lifeline.heard(time.monotonic())
            conn.send_bytes(p.encode([{"t": "cast", "n": "sink", "k": "k", "m": "x"}]))
            time.sleep(0.05)
        assert _wait_exit(pid, 0) is None
        conn.send_bytes(p.encode([{"t": "stop", "reason": "test"}]))
        assert _wait_exit(pid, 5.0) == 0
        assert p.decode(conn.recv_bytes()) == [{"t": "exit", "reason": "test"}]
    finally:
        _kill(pid)
        conn.close()


def _switches(pid: int) -> int:
    """Times any thread of ``pid`` went to sleep and woke up again."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        for line in open(f"/proc/{pid}/task/{tid}/status"):
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not zygote_mod.available(), reason="the zygote needs Linux pidfds")
def test_the_zygote_watches_the_lifeline_for_its_keyed_processes_which_never_wake_for_it() -> None:
    lifeline = child_main.Lifeline(fence_after=0.6, check_every=0.1)
    zygote = zygote_mod.Zygote(KeyedChild, ChildConfig(), lifeline, lambda name: Sink, [])
    try:
        process, fd = zygote.fork()
        conn = billiard.connection.Connection(fd)
        _assign(conn, "k3")
        # Idle while its worker hears the broker: it does not run at all (its own check would
        # wake it every 0.1 s here).
        time.sleep(0.2)
        before = _switches(process.pid)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            lifeline.heard(time.monotonic())
            time.sleep(0.05)
        assert _switches(process.pid) - before <= 1
        assert process.exitcode is None
        # Cut off: the zygote kills it within a check, and reports it as fenced.
        cut = time.monotonic()
        assert zygote.wait(process.pid, 5.0) == child_main.FENCED
        assert time.monotonic() - cut < lifeline.fence_after + 1.0
        process.close()
        conn.close()
    finally:
        zygote.stop()


def test_a_keyed_process_drops_a_message_it_cannot_act_on_and_lives_on() -> None:
    pid, conn = _fork_spare(child_main.Lifeline(fence_after=60.0, check_every=0.1))
    try:
        _assign(conn, "k")
        # What a worker forwards as it came (it routes on n and k only), forged or broken.
        conn.send_bytes(b"\n".join([
            b'{"t":"cast","n":"sink","k":"k"}',  # no message
            b'{"t":"call","n":"sink","k":"k"}\t1',  # no one to answer
            b'{"t":"call","n":"sink","k":"k","r":"r","c":"no-message"}',
            b'{"t":"nonsense"}', b'{"t":[1]}', b"{}",
            b'{"t":"call","n":"sink","k":"k","r":"r","c":"good"}\t7',
        ]))
        answers: list[dict[str, Any]] = []
        while len(answers) < 2 and conn.poll(5):
            answers += p.decode(conn.recv_bytes())
        assert [(a["c"], a.get("error")) for a in answers] == [("no-message", "invalid"), ("good", None)]
        assert p.payload(answers[1]) == 7
        assert _wait_exit(pid, 0.0) is None, "the keyed process ended"
    finally:
        _kill(pid)
        conn.close()


@pytest.mark.parametrize("spares", [0, 1], ids=["forked-for-the-key", "spare"])
def test_the_pool_keeps_each_keys_init_args_parallel_to_its_registry(spares: int) -> None:
    # What a node's REPORT carries for a rebuilt leader: each key's args, by a real fork (spares=0)
    # and by a spare given its key (spares=1: the zygote's, where it runs).


    children, answers = pool_with_answers("args@test", Sink, ChildConfig(fence_after=3600.0, spares=spares))
    children.start()
    try:
        if spares:
            wait_for(lambda: children.spares == 1, 10, 0.02, "no spare forked")
        given = {"a": [1, "x"], "b": [], "c": [{"deep": [None]}]}
        for key, args in given.items():
            children.spawn("sink", key, args, f"sid-{key}", [["reply", key]])
            assert answers.get(timeout=10)["c"] == key
        procs, args_of, _ = children.registry_report()
        assert children.registry() == procs and children.registry_args() == args_of
        assert len(args_of) == len(procs) == 3
        assert {entry[1]: a for entry, a in zip(procs, args_of, strict=True)} == given
        assert all(entry[2] is not None for entry in procs)  # started: these are real processes
    finally:
        children.stop_all("test", 1.0)
        children.stop()


def test_child_config_carries_every_per_process_setting_from_the_settings() -> None:
    from dataclasses import fields

    from forseti_celery.core.conf import Settings

    s = Settings.from_app({"forseti_stop_timeout": 7.5, "forseti_heartbeat": 0.5, "forseti_node_timeout": 9.0,
                           "forseti_spares": 5, "forseti_mailbox_limit": 4096, "forseti_max_message_size": 2048})
    config = ChildConfig.from_settings(s)
    assert config == ChildConfig(stop_timeout=7.5, fence_after=8.0, heartbeat=0.5, spares=5, mailbox_limit=4096,
                                 max_message_size=2048)
    # Each field is a setting of that name (fence_after: Settings' property), defaults included.
    assert all(getattr(s, f.name) == getattr(config, f.name) for f in fields(ChildConfig))
    assert ChildConfig.from_settings(Settings()) == ChildConfig()


class Ticking(KeyedProcess):
    """A repeating timer from init, every 0.05 s, ``keep_alive`` as its args say."""

    def init(self, key: str, keep_alive: bool = True, *args: Any) -> None:
        self.send_every(0.05, "tick", keep_alive=keep_alive)


@pytest.mark.parametrize("keep_alive", [True, False], ids=["keep-alive", "plain"])
def test_a_keep_alive_timer_tells_the_worker_touch_at_most_once_a_second_and_a_plain_one_never(
        keep_alive: bool) -> None:
    pid, conn = _fork_spare(child_main.Lifeline(fence_after=60.0, check_every=0.1), Ticking)
    try:
        conn.send_bytes(p.encode([{"t": "assign", "n": "ticking", "k": "k", "a": [keep_alive]}]))
        assert conn.poll(5) and p.decode(conn.recv_bytes()) == [{"t": "started"}]
        touches: list[float] = []
        end = time.monotonic() + 2.6
        while time.monotonic() < end:
            if conn.poll(0.05):
                for msg in p.decode(conn.recv_bytes()):
                    assert msg == {"t": "touch"}, msg
                    touches.append(time.monotonic())
        # Fired every 0.05 s for 2.6 s: one touch at the first, then one a second.
        assert len(touches) == (3 if keep_alive else 0), touches
        assert all(b - a >= 0.95 for a, b in itertools.pairwise(touches)), touches
        conn.send_bytes(p.encode([{"t": "stop", "reason": "test"}]))
        assert _wait_exit(pid, 5.0) == 0
    finally:
        _kill(pid)
        conn.close()
