"""Timers of a keyed process (send_after, send_every, Timer.cancel, handle_info) on real workers,
both brokers: delivered in order with the other messages, one at a time, cancelled for good."""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forseti_celery import Forseti, InvalidArgument, KeyRef, Timer
from forseti_celery.core import process
from forseti_celery.testing import Cluster, short_hostname, wait_for
from tests.helpers import ROOT, client_app, fresh


class _Cluster:
    """One worker of ``tests.timers_app`` on a namespace of its own, and a client of it."""

    def __init__(self, broker_url: str, tmp: Path) -> None:
        namespace = f"forseti-t{uuid.uuid4().hex[:8]}"
        self.cluster = Cluster("tests.timers_app", 1, broker_url=broker_url, log_dir=tmp / "logs",
                               env={"FORSETI_NAMESPACE": namespace}, cwd=str(ROOT),
                               hostnames=[f"timers-{namespace[-6:]}@{short_hostname()}"])
        self.forseti = Forseti.of(client_app(broker_url, namespace))
        self.tmp = tmp

    def ticker(self) -> KeyRef:
        return self.forseti.get_key(fresh("ticker"), name="ticker", timeout=20)


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def timers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Cluster]:
    """A cluster per broker, shared by this module's tests (each uses keys of its own)."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    c = _Cluster(url, tmp_path_factory.mktemp(f"timers-{request.param}"))
    c.cluster.start()
    try:
        wait_for(lambda: len(c.forseti.get_metrics(timeout=2)) == 1 or None, 30, 0.1)
        yield c
    finally:
        c.forseti.close()
        orphans = c.cluster.stop()
        assert not orphans, f"orphan processes left: {orphans}"


def _log(ref: KeyRef) -> dict[str, Any]:
    return ref.call("log", timeout=10)  # type: ignore[no-any-return]


def _infos(ref: KeyRef) -> list[Any]:
    return [entry[1] for entry in _log(ref)["log"] if entry[0] == "info"]


def _switches(pid: int) -> int:
    """Times any thread of ``pid`` went to sleep and woke up again."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


def test_a_one_shot_timer_sends_its_message_once_after_its_delay(timers: _Cluster) -> None:
    ref = timers.ticker()
    ref.send({"op": "after", "id": "a", "delay": 0.3, "msg": {"tick": 1}})
    set_at = _log(ref)["now"]  # the cast was handled before this call: the timer runs from about here
    wait_for(lambda: _infos(ref) == [{"tick": 1}] or None, 10, 0.05)
    fired_at = next(e[2] for e in _log(ref)["log"] if e[0] == "info")
    assert 0.25 <= fired_at - set_at < 2.0
    time.sleep(0.5)
    assert _infos(ref) == [{"tick": 1}]


def test_a_repeating_timer_runs_until_another_handler_cancels_it(timers: _Cluster) -> None:
    ref = timers.ticker()
    ref.send({"op": "every", "id": "r", "interval": 0.05, "msg": "tock"})
    wait_for(lambda: len(_infos(ref)) >= 5 or None, 10, 0.05)
    ref.send({"op": "cancel", "id": "r"})
    after_cancel = _log(ref)
    n = len([e for e in after_cancel["log"] if e[0] == "info"])
    assert after_cancel["cancelled"] == {"r": True}
    times = [e[2] for e in after_cancel["log"] if e[0] == "info"]
    assert all(b - a >= 0.04 for a, b in itertools.pairwise(times)), times
    time.sleep(0.4)
    assert len(_infos(ref)) == n
    ref.send({"op": "cancel", "id": "r"})  # idempotent
    assert _log(ref)["cancelled"] == {"r": False}


def test_a_cancelled_one_shot_never_arrives_and_cancelling_a_fired_one_does_nothing(timers: _Cluster) -> None:
    ref = timers.ticker()
    ref.send({"op": "after", "id": "late", "delay": 0.3, "msg": "never"})
    ref.send({"op": "cancel", "id": "late"})
    ref.send({"op": "after", "id": "soon", "delay": 0.05, "msg": "soon"})
    wait_for(lambda: _infos(ref) == ["soon"] or None, 10, 0.05)
    ref.send({"op": "cancel", "id": "soon"})
    assert _log(ref)["cancelled"] == {"late": True, "soon": False}
    time.sleep(0.5)
    assert _infos(ref) == ["soon"]


def test_a_timer_cancelled_after_it_came_due_but_before_its_turn_is_not_handled(timers: _Cluster) -> None:
    ref = timers.ticker()
    ref.send({"op": "after", "id": "t", "delay": 0.1, "msg": "cancelled while due"})
    ref.send({"op": "block", "seconds": 0.5})  # the timer comes due during this
    ref.send({"op": "cancel", "id": "t"})  # queued before the timer's message: handled first
    assert _log(ref)["cancelled"] == {"t": True}
    time.sleep(0.2)
    assert _infos(ref) == []


def test_a_timer_due_while_messages_wait_is_handled_after_them_one_at_a_time(timers: _Cluster) -> None:
    ref = timers.ticker()
    ref.send({"op": "after", "id": "t", "delay": 0.1, "msg": "due during the block"})
    ref.send({"op": "block", "seconds": 0.6})
    for i in range(5):
        ref.send({"n": i})
    wait_for(lambda: _infos(ref) or None, 10, 0.05)
    log = _log(ref)["log"]
    kinds = [(e[0], e[1]) for e in log]
    assert kinds == [("cast", {"op": "after", "id": "t", "delay": 0.1, "msg": "due during the block"}),
                     ("cast", {"op": "block", "seconds": 0.6})] \
        + [("cast", {"n": i}) for i in range(5)] + [("info", "due during the block")]


def test_handle_info_defaults_to_handle_cast(timers: _Cluster) -> None:
    ref = timers.forseti.get_key(fresh("cast-only"), name="cast-only", timeout=20)
    wait_for(lambda: ref.call("seen", timeout=10) == ["from a timer"] or None, 10, 0.05)


def test_the_function_form_receives_its_timers_messages_from_receive(timers: _Cluster) -> None:
    path = timers.tmp / f"{uuid.uuid4().hex}.jsonl"
    ref = timers.forseti.get_key(fresh("fn"), [str(path)], name="function-timers", timeout=20)

    def lines() -> list[Any]:
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    wait_for(lambda: ("once" in lines() and lines().count("tick") >= 3) or None, 10, 0.05)
    ref.send("a cast")
    wait_for(lambda: "a cast" in lines() or None, 10, 0.05)
    time.sleep(0.3)  # the ticker was cancelled at its third tick
    assert lines().count("tick") == 3 and lines().count("once") == 1
    ref.stop(timeout=10)


def test_a_bad_delay_or_interval_is_refused_with_invalid_argument(timers: _Cluster) -> None:
    ref = timers.ticker()
    for every, seconds in ((False, -1), (False, None), (False, float("nan")), (False, True), (False, "1"),
                           (True, 0), (True, -0.5), (True, 1e10), (False, 1e10)):
        answer = ref.call({"op": "bad", "every": every, "seconds": seconds}, timeout=10)
        assert answer.startswith("InvalidArgument: " + ("interval" if every else "delay")), (every, seconds, answer)
    assert ref.call({"op": "bad", "every": False, "seconds": 0}, timeout=10) == "accepted"


def test_an_idle_keyed_process_never_wakes_up_for_timers_it_has_not_or_no_longer_has(timers: _Cluster) -> None:
    ref = timers.ticker()
    _log(ref)
    time.sleep(0.2)
    before = _switches(ref.pid)
    time.sleep(1.0)
    assert _switches(ref.pid) - before <= 1  # no timer: no wake-up (the zygote watches the lifeline)
    ref.send({"op": "every", "id": "r", "interval": 0.05, "msg": "tock"})
    wait_for(lambda: len(_infos(ref)) >= 3 or None, 10, 0.05)
    before = _switches(ref.pid)
    time.sleep(0.5)
    assert _switches(ref.pid) - before >= 5  # the repeating timer does wake it: the count sees wake-ups
    ref.send({"op": "cancel", "id": "r"})
    _log(ref)
    time.sleep(0.2)
    before = _switches(ref.pid)
    time.sleep(1.0)
    assert _switches(ref.pid) - before <= 1


def test_timers_are_only_set_inside_a_keyed_process_and_a_timer_reads_back() -> None:
    import forseti_celery

    with pytest.raises(RuntimeError, match="send_after"):
        forseti_celery.send_after(1, "x")
    with pytest.raises(RuntimeError, match="send_every"):
        forseti_celery.send_every(1, "x")
    assert process._mailbox is None
    calls: list[Any] = []
    t = Timer(1.0, "m", None, False, calls.append)
    assert t.active and t.cancel() is True and calls == [t] and not t.active
    assert t.cancel() is False and calls == [t]
    with pytest.raises(InvalidArgument):
        class Box:
            def start_timer(self, *args: Any) -> None:
                raise AssertionError("a bad delay reached the mailbox")

            def receive(self, timeout: float | None) -> None:
                return None
        process._mailbox = Box()  # type: ignore[assignment]
        try:
            forseti_celery.send_after(-1, "x")
        finally:
            process._mailbox = None


def test_the_timer_heap_fires_in_due_order_skips_missed_ticks_and_forgets_cancelled_timers() -> None:
    from forseti_celery.child.timers import Timers

    timers = Timers()
    a = timers.add(2.0, "a", None, False)
    b = timers.add(1.0, "b", None, False)
    c = timers.add(1.0, "c", 0.5, False)
    assert timers.wait(0.0) == 1.0
    assert [t.msg for t in timers.due(1.0)] == ["b", "c"]  # equal due times: in the order they were set
    assert [t.msg for t in timers.due(3.2)] == ["c", "a"]  # c due at 1.5; its ticks to 3.0 missed: one, not three
    assert c.due == 3.7 and timers.wait(3.2) == pytest.approx(0.5)
    assert a.active and b.active  # fired, not handled yet: the mailbox makes a one-shot inactive once handled
    c.cancel()
    assert timers.wait(3.2) is None and not timers.heap
    # A process that keeps re-arming a far timeout holds only its live timers.
    for i in range(1000):
        timers.add(100.0 + i, i, None, False).cancel()
    assert len(timers.heap) <= 130
