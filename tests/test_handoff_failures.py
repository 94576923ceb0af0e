"""A warm shutdown's handoff going wrong (issue 13), both brokers: ``snapshot`` raising,
``restore`` raising, a 5 MB snapshot, the handoff bound exceeded, the target worker and the
leader dying mid-handoff. Whatever goes wrong, the stopping worker leaves by itself, within its
bound; a key is never live twice (the journal monitor, checked at the module's end) and ends up
live exactly once when next addressed.

One cluster per broker (3 workers of ``tests.state_app``, ``forseti_handoff_timeout`` 8 s):
each test shuts down (or kills) some, and the next test starts with three again."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from forseti_celery import KeyRef
from forseti_celery.testing import WorkerProcess, wait_for
from tests.chaos_support import Monitor, wait_one_leader
from tests.handoff_support import journal_of, message, state_cluster, worker_of_pid
from tests.helpers import Harness, alive, fresh

HANDOFF_TIMEOUT = 8.0
BIG = 5 * 1024 * 1024


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Harness, Monitor]]:
    url = request.getfixturevalue(f"{request.param}_url")
    with state_cluster(url, tmp_path_factory.mktemp(request.param), 3,
                       FORSETI_HANDOFF_TIMEOUT=str(HANDOFF_TIMEOUT)) as (h, monitor):
        yield h, monitor


@pytest.fixture
def h(cluster: tuple[Harness, Monitor]) -> Iterator[Harness]:
    """The module's cluster with three live workers; no two live processes of a key so far."""
    h, monitor = cluster
    while len(h.cluster.alive) < 3:
        h.cluster.add_worker()
    h.wait_members(3)
    yield h
    assert monitor.violations() == []


def worker(h: Harness, hostname: str) -> WorkerProcess:
    return next(w for w in h.cluster.workers if w.hostname == hostname and w.alive)


def fragile(h: Harness, key: str, *args: Any, sends: int = 3) -> KeyRef:
    """A ``fragile`` key started with ``args``, having counted ``sends`` calls."""
    ref = h.forseti.get_key(key, name="fragile", args=args, timeout=30)
    for seq in range(1, sends + 1):
        h.forseti.call(key, message("t", seq), name="fragile", args=args)
    return ref


def placed(h: Harness, name: str, args: tuple[Any, ...], where: Callable[[str], bool]) -> KeyRef:
    """A new key of ``name`` whose worker satisfies ``where`` (least-used placement: the keys that
    land elsewhere first stay until one lands there, so the counts move on, then stop)."""
    others: list[KeyRef] = []
    for _ in range(10):
        ref = h.forseti.get_key(fresh(name), name=name, args=args, timeout=30)
        if where(ref.node):
            break
        others.append(ref)
    else:
        raise AssertionError(f"no {name} key was placed where asked: {[r.node for r in others]}")
    for other in others:
        other.stop()
    return ref


def tally_on(h: Harness, node: str) -> str:
    """A ``tally`` key placed on ``node``, having counted 1."""
    key = placed(h, "tally", (), lambda host: host == node).key
    h.forseti.call(key, message("t", 1), name="tally")
    return key


def state(h: Harness, key: str, *args: Any, name: str = "fragile") -> dict[str, Any]:
    """The key's state, from its one live process (started with ``args`` if there is none)."""
    return h.forseti.call(key, "state", name=name, args=args, timeout=30)  # type: ignore[no-any-return]


def ended(h: Harness, ref: KeyRef) -> str | None:
    """Why ``ref``'s process ended, as its ``terminate`` journaled it (None: it did not run it)."""
    return next((e["reason"] for e in journal_of(h, ref.key, "terminate") if e["pid"] == ref.pid), None)


def gone(pid: int) -> None:
    """Wait for ``pid`` to be gone (a child notices its worker's exit on its own)."""
    wait_for(lambda: not alive(pid), 10, 0.05, f"pid {pid} outlived its worker")


def leave(h: Harness, node: str) -> None:
    """Shut ``node`` down warm; it must leave by itself (well within the test's 60 s)."""
    w = worker(h, node)
    assert w.stop(60) == 0, f"{node} did not leave by itself\n{w.log_tail()}"


def test_a_snapshot_that_raises_ends_its_process_as_today_and_the_others_still_move(h: Harness) -> None:
    bad = fragile(h, fresh("snap-raises"), "snapshot-raises")
    good = tally_on(h, bad.node)
    log = worker(h, bad.node)
    leave(h, bad.node)
    assert ended(h, bad) == "shutdown"
    gone(bad.pid)
    assert "snapshot asked to raise" in log.log_text()
    moved = state(h, good, name="tally")
    assert (moved["count"], moved["restored"]) == (1, True)
    again = state(h, bad.key, "snapshot-raises")  # started anew, as a key whose worker left today
    assert (again["count"], again["restored"], again["dups"]) == (0, False, 0)


def test_a_restore_that_raises_leaves_the_key_startable_again_once(h: Harness) -> None:
    bad = fragile(h, fresh("restore-raises"), "restore-raises")
    leave(h, bad.node)
    wait_for(lambda: "restore asked to raise" in h.cluster.log_tails(400), 30, 0.2,
             lambda: f"no worker logged the failed restore\n{h.cluster.log_tails()}")
    again = state(h, bad.key, "restore-raises")
    assert again["pid"] != bad.pid and again["restored"] is False
    assert [e["pid"] for e in journal_of(h, bad.key, "start")][-1] == again["pid"]


def test_a_5_mb_snapshot_moves_whole(h: Harness) -> None:
    big = fragile(h, fresh("big"), "big", BIG)
    leave(h, big.node)
    moved = state(h, big.key, "big", BIG)  # its restore checked the ballast's length
    assert (moved["count"], moved["restored"], moved["dups"], moved["gaps"]) == (3, True, 0, 0)
    assert moved["incarnations"] == [big.pid, moved["pid"]]


def test_a_snapshot_past_the_handoff_timeout_ends_its_process_and_the_worker_leaves_anyway(h: Harness) -> None:
    slow = fragile(h, fresh("slow"), "slow", 4 * HANDOFF_TIMEOUT)
    leave(h, slow.node)
    gone(slow.pid)
    again = state(h, slow.key, "slow", 1)
    assert (again["count"], again["restored"]) == (0, False)
    assert len(journal_of(h, slow.key, "start")) == 2


def handing_off(h: Harness, node: str) -> threading.Thread:
    """``node``'s warm shutdown, under way in a thread."""
    w = worker(h, node)
    thread = threading.Thread(target=w.stop, args=(60,), daemon=True)
    thread.start()
    return thread


def test_the_target_worker_dying_mid_handoff_leaves_the_key_live_exactly_once(h: Harness) -> None:
    key = fresh("target-dies")
    ref = fragile(h, key, "slow-restore", 3)
    source = worker(h, ref.node)
    leaving = handing_off(h, ref.node)
    restoring = wait_for(lambda: [e for e in journal_of(h, key, "restoring") if e["pid"] != ref.pid], 30, 0.01,
                         lambda: f"{key} never began its restore elsewhere\n{h.cluster.log_tails()}")
    target = wait_for(lambda: worker_of_pid(h, restoring[0]["pid"]), 5, 0.01, "the restoring process has no worker")
    target.kill()  # SIGKILL, while the key's new process restores
    live_once(h, key, ("slow-restore", 0.1), source, leaving, "target died mid-handoff")


def test_the_leader_dying_mid_handoff_leaves_the_key_live_exactly_once(h: Harness) -> None:
    leader = wait_one_leader(h, [w.hostname for w in h.cluster.alive])
    ref = placed(h, "fragile", ("slow", 2), lambda host: host != leader)  # not the leader that stops
    key = ref.key
    h.forseti.call(key, message("t", 1), name="fragile", args=("slow", 2))
    source = worker(h, ref.node)
    leaving = handing_off(h, ref.node)
    wait_for(lambda: journal_of(h, key, "snapshot"), 30, 0.01, lambda: f"{key} never began its snapshot")
    worker(h, leader).kill()  # SIGKILL, while the key's process takes its snapshot
    live_once(h, key, ("slow", 0.1), source, leaving, "leader died mid-handoff")


def live_once(h: Harness, key: str, args: tuple[Any, ...], source: WorkerProcess, leaving: threading.Thread,
              what: str) -> None:
    """The stopping worker left by itself, and the key has one live process (started now if none)."""
    leaving.join(70)
    assert source.returncode == 0, source.log_tail()
    final = state(h, key, *args)
    live = h.forseti.search_key(key, name="fragile")
    assert live is not None and live.pid == final["pid"] and alive(final["pid"])
    print(f"\n[{what}] the key came back {'with' if final['restored'] else 'without'} its state "
          f"(count {final['count']})")
