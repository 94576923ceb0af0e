"""Handoff on warm shutdown, the worker's and the leader's side (issue 13), both brokers, real
workers of ``tests.state_app``: a movable key moves with its state while key-addressed sends keep
coming (none lost, their order kept), a key that is not movable ends as before, and a snapshot
that raises or comes past ``forseti_handoff_timeout`` ends its process as a shutdown does.

One cluster of two workers per broker (``forseti_handoff_timeout`` 3 s); each test shuts one down
warm and starts another. The journal monitor checks, at the module's end, that no key ever had two
live processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from forseti_celery import KeyRef
from forseti_celery.testing import WorkerProcess, wait_for
from tests.handoff_support import journal_of, message, state_cluster, worker_of_pid
from tests.helpers import Harness, events, fresh

HANDOFF_TIMEOUT = 3.0


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """Two workers of ``tests.state_app`` on the broker (the monitor checks them on the way out)."""
    env = {"FORSETI_HANDOFF_TIMEOUT": str(HANDOFF_TIMEOUT)}
    with state_cluster(request.getfixturevalue(f"{request.param}_url"), tmp_path_factory.mktemp("handoff"), 2,
                       **env) as (harness, _):
        yield harness


def leave(h: Harness, node: str) -> float:
    """Shut ``node`` down warm (it leaves by itself), then start another worker: the next test has
    two again. Returns how long the shutdown took (seconds)."""
    w: WorkerProcess = next(w for w in h.cluster.workers if w.hostname == node and w.alive)
    began = time.monotonic()
    assert w.stop(60) == 0, f"{node} did not leave by itself\n{w.log_tail()}"
    took = time.monotonic() - began
    h.cluster.add_worker()
    h.wait_members(2)
    return took


def state(h: Harness, key: str, name: str, *args: Any) -> dict[str, Any]:
    return h.forseti.call(key, "state", name=name, args=args, timeout=30)  # type: ignore[no-any-return]


def terminated(h: Harness, ref: KeyRef) -> str | None:
    """The reason ``ref``'s process ran ``terminate`` with (None: it did not)."""
    return next((e["reason"] for e in journal_of(h, ref.key, "terminate") if e["pid"] == ref.pid), None)


def test_a_warm_shutdown_moves_a_movable_key_with_its_state_while_key_addressed_sends_keep_their_order(
        h: Harness) -> None:
    key = fresh("tally")
    with events(h) as received:
        old = h.forseti.get_key(key, name="tally", timeout=30)  # (its start event: the receiver hears)
        moved_event = sends_around_a_warm_shutdown(h, key, old, received)
    assert (moved_event["name"], moved_event["source"]) == ("tally", old.node) and moved_event["pause_ms"] >= 0
    moved = state(h, key, "tally")
    assert moved_event["target"] == worker_of_pid(h, moved["pid"]).hostname  # type: ignore[union-attr]


def sends_around_a_warm_shutdown(h: Harness, key: str, old: KeyRef, received: list[dict[str, Any]]) -> dict[str, Any]:
    """Key-addressed sends to ``key`` before, during and after its worker's warm shutdown: none lost,
    none twice, in order, and its state moved; the key's ``forseti-process-moved`` event."""
    sent = 0
    stop = threading.Event()

    def sender() -> None:
        nonlocal sent
        while not stop.is_set():
            h.forseti.send(key, message("c", sent + 1), name="tally")
            sent += 1
            time.sleep(0.002)

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        wait_for(lambda: sent >= 200, timeout=30, message="sends before the shutdown")
        leave(h, old.node)
        after = sent
        wait_for(lambda: sent >= after + 200, timeout=30, message="sends after the shutdown")
    finally:
        stop.set()
        thread.join(30)
    count = h.forseti.call(key, message("c", sent + 1), name="tally", timeout=30)  # behind every send
    moved = state(h, key, "tally")
    assert (count, moved["gaps"], moved["dups"]) == (sent + 1, 0, 0)  # none lost, none twice, in order
    assert moved["restored"] and moved["incarnations"] == [old.pid, moved["pid"]]
    assert terminated(h, old) == "handoff"
    new = worker_of_pid(h, moved["pid"])
    assert new is not None and new.hostname != old.node
    return wait_for(lambda: next((e for e in received if e["type"] == "forseti-process-moved" and e["key"] == key),
                                 None), 10, message="no forseti-process-moved event")


def test_a_key_that_is_not_movable_ends_with_the_warm_shutdown_as_before_beside_one_that_moves(
        h: Harness) -> None:
    plain = h.forseti.get_key(fresh("plain"), timeout=30)  # tests.app's Counter: no snapshot
    node = plain.node
    movable = None
    for _ in range(10):  # least-used placement: a tally on the same worker within a few tries
        ref = h.forseti.get_key(fresh("tally"), name="tally", timeout=30)
        if ref.node == node:
            movable = ref
            break
    assert movable is not None, f"no tally key was placed on {node}"
    h.forseti.call(movable.key, message("c", 1), name="tally")
    leave(h, node)
    assert terminated(h, plain) == "shutdown"
    again = h.forseti.get_key(plain.key, timeout=30)
    assert again.pid != plain.pid and len(journal_of(h, plain.key, "start")) == 2  # started afresh
    moved = state(h, movable.key, "tally")
    assert (moved["count"], moved["restored"]) == (1, True)


def test_a_snapshot_that_raises_ends_its_process_as_a_shutdown_and_its_key_starts_afresh(h: Harness) -> None:
    key = fresh("raises")
    ref = h.forseti.get_key(key, name="fragile", args=["snapshot-raises"], timeout=30)
    h.forseti.call(key, message("c", 1), name="fragile", args=["snapshot-raises"])
    leave(h, ref.node)
    assert terminated(h, ref) == "shutdown"
    fresh_state = state(h, key, "fragile", "snapshot-raises")
    assert (fresh_state["count"], fresh_state["restored"]) == (0, False)
    assert fresh_state["pid"] != ref.pid


def test_a_snapshot_past_the_handoff_timeout_is_dropped_and_the_worker_leaves_within_its_bound(h: Harness) -> None:
    key = fresh("slow")
    args = ["slow", HANDOFF_TIMEOUT + 2]
    ref = h.forseti.get_key(key, name="fragile", args=args, timeout=30)
    h.forseti.call(key, message("c", 1), name="fragile", args=args)
    took = leave(h, ref.node)
    # Its snapshot came 2 s past the bound: dropped; the worker waited no longer than the process took.
    assert took < 60
    late = state(h, key, "fragile", *args)
    assert (late["count"], late["restored"]) == (0, False)
    assert late["pid"] != ref.pid
