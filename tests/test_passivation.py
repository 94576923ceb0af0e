"""Passivation and key-addressed delivery across incarnations (issue 12), on real workers, both
brokers: an idle process is stopped (``terminate("idle")``, its key freed, an exit event saying
``idle``) without any thread waking for it before its deadline; a key-addressed message whose
process has gone (passivated, passivating, another pid) reaches the key's next incarnation, in
order, and its sender hears where the key went (``moved``)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forseti_celery import KeyRef
from forseti_celery.core import protocol as p
from forseti_celery.core.broker import Publisher
from forseti_celery.core.messages import MOVED, Call, Cast, Moved, Reply
from forseti_celery.testing import wait_for
from forseti_celery.worker.pool.idle import Idle
from forseti_celery.worker.pool.outbox import Outbox
from forseti_celery.worker.pool.table import Child, Table
from tests.helpers import Harness, alive, events, fresh, harness


@contextlib.contextmanager
def passivating(broker_url: str, tmp: Path, n: int = 2, **env: str) -> Iterator[Harness]:
    """``n`` workers of ``tests.passivation_app`` and a client."""
    with harness(broker_url, tmp, n=n, app="tests.passivation_app", **env) as h:
        yield h


class Sender:
    """A client of our own, by hand: writes key-addressed casts and calls (the optional fields of
    :class:`Cast`/:class:`Call`) to a worker's queue, and reads its private reply queue (the
    ``moved`` notices and the answers)."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.names = h.forseti.names
        self.queue = self.names.reply_queue(f"w2-{uuid.uuid4().hex[:8]}")
        self.reply_to = self.queue.routing_key
        self._conn = h.app.connection_for_write()
        self._publisher = Publisher(self._conn, keep=self.names.queue_ttl)
        self._read = h.app.connection_for_read()
        self._bound = self.queue(self._read.default_channel)
        self._bound.declare()
        self.seq = 0
        self.heard: list[dict[str, Any]] = []

    def send(self, ref: KeyRef, msgs: list[Any], call: Any = None) -> str | None:
        """``msgs`` as key-addressed casts to ``ref`` (then ``call`` as a call): one broker message."""
        out = []
        for msg in msgs:
            self.seq += 1
            cast = Cast(ref.name, ref.key, ref.pid, key_addressed=True, args=[], seq=self.seq, reply_to=self.reply_to)
            out.append(p.encode_message(cast.to_wire(), "message", 1 << 20, payload=msg))
        corr = None
        if call is not None:
            self.seq += 1
            corr = uuid.uuid4().hex
            wire = Call(ref.name, ref.key, ref.pid, self.reply_to, corr, time.time() + 30, key_addressed=True,
                        args=[], seq=self.seq).to_wire()
            out.append(p.encode_message(wire, "message", 1 << 20, payload=call))
        self._publisher.publish(self.names.exchange, self.names.node_routing_key(ref.node), out)
        return corr

    def receive(self, until: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
        """What the reply queue holds, read until ``until(everything heard)`` holds."""
        def done() -> list[dict[str, Any]] | None:
            while (m := self._bound.get(no_ack=True)) is not None:
                self.heard.extend(p.decode(m.body, routed=False))
            return self.heard if until(self.heard) else None
        return wait_for(done, timeout, 0.05, lambda: f"heard only {self.heard}\n{self.h.cluster.log_tails()}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._bound.delete()
        self._publisher.close()
        self._conn.release()
        self._read.release()


@contextlib.contextmanager
def sender(h: Harness) -> Iterator[Sender]:
    s = Sender(h)
    try:
        yield s
    finally:
        s.close()


def journal(h: Harness, key: str, ev: str | None = None) -> list[dict[str, Any]]:
    return [e for e in h.journal() if e["key"] == key and (ev is None or e["ev"] == ev)]


def gone(h: Harness, ref: KeyRef) -> None:
    """Wait until ``ref``'s process has passivated: ended, its key free at the leader."""
    wait_for(lambda: not alive(ref.pid) and h.forseti.search_key(ref.key, name=ref.name) is None, 15, 0.05,
             lambda: f"{ref} was never passivated\n{h.cluster.log_tails()}")


@pytest.fixture(params=["redis", "rabbitmq"])
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    with passivating(request.getfixturevalue(f"{request.param}_url"), tmp_path) as cluster:
        yield cluster


def test_an_idle_process_is_passivated_terminate_idle_runs_its_key_is_freed_and_its_exit_event_says_idle(
    h: Harness,
) -> None:
    key = fresh("idle")
    with events(h) as received:
        ref = h.forseti.get_key(key, name="idle")
        busy_until = time.monotonic() + 1.5
        while time.monotonic() < busy_until:  # three idle timeouts, never 0.5 s without a cast
            ref.send("busy")
            time.sleep(0.15)
        assert alive(ref.pid) and h.forseti.search_key(key, name="idle") == ref, "passivated while it had casts"
        gone(h, ref)
        wait_for(lambda: [e for e in received if e.get("type") == p.EVENT_EXITED and e.get("key") == key], 10)
    (exited,) = [e for e in received if e.get("type") == p.EVENT_EXITED and e.get("key") == key]
    assert exited["reason"] == "idle" and exited["child_pid"] == ref.pid
    assert [e["reason"] for e in journal(h, key, "terminate")] == ["idle"]
    again = h.forseti.get_key(key, name="idle")  # a new incarnation, on demand
    assert again.pid != ref.pid and again.call("seen") == {"seen": [], "pid": again.pid}


def test_a_keep_alive_timer_keeps_its_process_from_passivating_and_another_timer_does_not(h: Harness) -> None:
    kept = h.forseti.get_key(fresh("kept"), name="kept_alive")
    polling = h.forseti.get_key(fresh("polling"), name="polling")
    gone(h, polling)  # 1.5 s after its start, ticks every 0.2 s notwithstanding
    time.sleep(2.0)  # more than its idle timeout again
    assert alive(kept.pid) and h.forseti.search_key(kept.key, name="kept_alive") == kept
    assert [e["reason"] for e in journal(h, polling.key, "terminate")] == ["idle"]
    assert not journal(h, kept.key, "terminate")


def test_a_key_addressed_message_to_a_passivated_pid_reaches_the_next_incarnation_and_its_sender_hears_moved(
    h: Harness,
) -> None:
    key = fresh("moved")
    old = h.forseti.get_key(key, name="idle")
    with sender(h) as s:
        s.send(old, ["a"])
        gone(h, old)
        corr = s.send(old, ["b", "c"], call="d")  # to the old pid, on the old worker
        heard = s.receive(lambda got: any(m.get("t") == "reply" for m in got)
                          and any(m.get("t") == MOVED and m["q"] == s.seq for m in got))
        (answer,) = [Reply.from_wire(m) for m in heard if m.get("t") == "reply"]
        assert answer.corr == corr and answer.error is None, answer
        value = p.payload({p.PAYLOAD: answer.payload})
        assert value["seen"] == ["b", "c", "d"] and value["pid"] != old.pid  # in order, none lost
        moved = [Moved.from_wire(m) for m in heard if m.get("t") == MOVED]
        assert {(m.node, m.pid, m.new_pid) for m in moved} == {(old.node, old.pid, value["pid"])}
        assert max(m.seq for m in moved) == s.seq
        now = h.forseti.search_key(key, name="idle")
        assert now is not None and (now.node, now.pid) == (moved[0].new_node, moved[0].new_pid)
        # Later arrivals for the old pid follow the redirect, behind the others.
        corr = s.send(old, ["e"], call="f")
        s.receive(lambda got: any(m.get("t") == "reply" and m.get("c") == corr for m in got))
    answers = [Reply.from_wire(m) for m in s.heard if m.get("c") == corr]
    assert p.payload({p.PAYLOAD: answers[0].payload})["seen"] == ["b", "c", "d", "e", "f"]
    assert [e["msg"] for e in journal(h, key) if e["ev"] in ("cast", "call")] == ["a", "b", "c", "d", "e", "f"]


def test_a_message_arriving_while_its_key_passivates_is_handled_by_the_next_incarnation(h: Harness) -> None:
    key = fresh("passivating")
    old = h.forseti.get_key(key, name="lingering_idle")
    # Its terminate takes a second: send while it runs, to the pid that is on its way out.
    wait_for(lambda: journal(h, key, "terminating"), 10, 0.02, "never passivated")
    with sender(h) as s:
        corr = s.send(old, [1, 2, 3], call=4)
        heard = s.receive(lambda got: any(m.get("c") == corr for m in got))
    (answer,) = [Reply.from_wire(m) for m in heard if m.get("c") == corr]
    value = p.payload({p.PAYLOAD: answer.payload})
    assert value["seen"] == [1, 2, 3, 4] and value["pid"] != old.pid
    starts = journal(h, key, "start")
    assert len(starts) == 2 and starts[1]["pid"] == value["pid"]
    # The new incarnation started only after the old one had ended: never two at once.
    (ended,) = journal(h, key, "terminate")
    assert ended["pid"] == old.pid and ended["t"] <= starts[1]["t"]


def test_a_message_arriving_while_its_process_is_stopped_is_handled_by_the_next_incarnation(h: Harness) -> None:
    key = fresh("stopping")
    old = h.forseti.get_key(key, name="slow_stop")
    stopper = threading.Thread(target=old.stop, kwargs={"timeout": 10})
    stopper.start()
    wait_for(lambda: journal(h, key, "terminating"), 10, 0.02, "never stopped")
    with sender(h) as s:
        corr = s.send(old, ["x"], call="y")
        heard = s.receive(lambda got: any(m.get("c") == corr for m in got))
    stopper.join(10)
    (answer,) = [Reply.from_wire(m) for m in heard if m.get("c") == corr]
    value = p.payload({p.PAYLOAD: answer.payload})
    assert value["seen"] == ["x", "y"] and value["pid"] != old.pid and not alive(old.pid)


def test_a_key_addressed_call_its_process_had_taken_when_it_was_killed_is_answered_crash_and_never_replayed(
    h: Harness,
) -> None:
    key = fresh("killed")
    ref = h.forseti.get_key(key, name="sleepy")
    with sender(h) as s:
        corr = s.send(ref, [], call={"sleep": 30})
        wait_for(lambda: journal(h, key, "call"), 10, 0.02, "the call never reached its process")
        os.kill(ref.pid, signal.SIGKILL)
        heard = s.receive(lambda got: any(m.get("c") == corr for m in got))
    (answer,) = [Reply.from_wire(m) for m in heard if m.get("c") == corr]
    assert (answer.error, answer.exc_type) == ("crash", "ProcessExited"), answer  # RemoteError, as a crash
    time.sleep(1.0)
    assert len(journal(h, key, "call")) == 1 and len(journal(h, key, "start")) == 1  # not replayed anywhere


def test_a_key_addressed_message_for_another_pid_goes_to_the_live_process_of_its_key(h: Harness) -> None:
    key = fresh("stale")
    ref = h.forseti.get_key(key, name="sleepy")
    stale = KeyRef(ref.node, 1, ref.key, ref.name)  # an incarnation long gone from this worker
    with sender(h) as s:
        corr = s.send(stale, ["x"], call="y")
        heard = s.receive(lambda got: any(m.get("c") == corr for m in got)
                          and any(m.get("t") == MOVED for m in got))
    (answer,) = [Reply.from_wire(m) for m in heard if m.get("c") == corr]
    assert p.payload({p.PAYLOAD: answer.payload}) == {"seen": ["x", "y"], "pid": ref.pid}
    (moved,) = [Moved.from_wire(m) for m in heard if m.get("t") == MOVED]
    assert (moved.pid, moved.new_node, moved.new_pid, moved.seq) == (1, ref.node, ref.pid, s.seq)


def test_the_idle_heap_keeps_no_entry_of_reaped_processes_for_their_whole_idle_timeout() -> None:
    table = Table()
    r, w = os.pipe()
    try:
        idle = Idle(table, lambda name: 3600.0, 1.0)
        kids = [Child("n", str(i), "s", None, None, w, Outbox(w, 1 << 20, lambda box: None)) for i in range(200)]
        for c in kids:
            idle.started(c)
        for c in kids[:150]:  # keys that came and went, each with an hour left on its clock
            c.gone = True
            idle.reaped(c)
        dead = sum(e[2].gone for e in idle._heap)  # swept once they were half of it
        assert len(idle._heap) < 150 and 2 * dead <= len(idle._heap), (len(idle._heap), dead)
        assert idle.next_due() is not None and idle.passivate_due(time.monotonic()) == 0
    finally:
        os.close(r)
        os.close(w)


def test_a_key_addressed_message_at_a_worker_that_never_ran_its_key_is_forwarded_to_the_worker_that_does(
    h: Harness,
) -> None:
    key = fresh("elsewhere")
    ref = h.forseti.get_key(key, name="sleepy")
    (other,) = [w.hostname for w in h.cluster.workers if w.hostname != ref.node]
    stray = KeyRef(other, 1, key, "sleepy")  # a ref no worker gave: the message reaches the wrong worker
    with sender(h) as s:
        corr = s.send(stray, [{"big": "x" * 20000}, "after"], call="last")  # a payload of its own chunk too
        heard = s.receive(lambda got: any(m.get("c") == corr for m in got)
                          and any(m.get("t") == MOVED for m in got))
    (answer,) = [Reply.from_wire(m) for m in heard if m.get("c") == corr]
    assert p.payload({p.PAYLOAD: answer.payload}) == {"seen": [{"big": "x" * 20000}, "after", "last"], "pid": ref.pid}
    (moved,) = [Moved.from_wire(m) for m in heard if m.get("t") == MOVED]
    assert (moved.node, moved.pid, moved.new_node, moved.new_pid, moved.seq) == (other, 1, ref.node, ref.pid, s.seq)


def _switches(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid`` so far (0 once it has gone)."""
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    return total


def _watcher_thread(worker: int, children: int) -> int:
    """The worker's thread that polls its children (its poll lists each one's pipe and exit)."""
    def polling(tid: str) -> bool:
        with contextlib.suppress(OSError), open(f"/proc/{worker}/task/{tid}/syscall") as f:
            fields = f.read().split()
            return fields[0] == "7" and int(fields[2], 16) >= 2 * children  # poll(fds, nfds, timeout)
        return False
    return wait_for(lambda: next((int(t) for t in os.listdir(f"/proc/{worker}/task") if polling(t)), None), 10,
                    0.1, "no thread of the worker polls its children")


def _thread_switches(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_thousand_idle_processes_cost_at_most_one_wake_up_a_second_in_total(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path,
) -> None:
    n = 1000
    with passivating(request.getfixturevalue(f"{broker}_url"), tmp_path, n=1) as h:
        refs = [h.forseti.get_key(f"sleepy-{i}", name="sleepy") for i in range(n)]
        pids = [r.pid for r in refs]
        assert len(set(pids)) == n and all(alive(x) for x in pids)
        worker = h.cluster.workers[0].pid
        watcher = _watcher_thread(worker, n)
        time.sleep(1.0)  # the last starts' answers and events are out
        before = sum(map(_switches, pids)), _thread_switches(worker, watcher)
        time.sleep(5.0)
        after = sum(map(_switches, pids)), _thread_switches(worker, watcher)
        children, watching = after[0] - before[0], after[1] - before[1]
        assert children + watching <= 5, f"{children} wake-ups of the idle processes, {watching} of the watcher in 5 s"
        assert all(alive(x) for x in pids)
