"""Restart policies on real workers, both brokers: which ends restart a key (with its args, on
the least-used worker, after the back-off), the intensity past which it stays down, a worker's
death, a leader failover during a back-off, and never two live processes of one key meanwhile."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forseti_celery import ForsetiTimeout, KeyRef
from forseti_celery.testing import wait_for
from tests.chaos_support import Monitor, ask, wait_one_leader
from tests.helpers import Harness, alive, events, fresh

ENDS = ("stop", "normal", "crash", "kill")
#: (policy, end) -> restarted?
RESTARTED = {("temporary", end): False for end in ENDS} | {
    ("transient", "stop"): False, ("transient", "normal"): False,
    ("transient", "crash"): True, ("transient", "kill"): True,
    ("permanent", "stop"): False, ("permanent", "normal"): True,
    ("permanent", "crash"): True, ("permanent", "kill"): True,
}


@contextlib.contextmanager
def restart_cluster(broker_url: str, tmp: Path, n: int) -> Iterator[tuple[Harness, Monitor]]:
    """``n`` workers of ``tests.restart_app``, a client, and a monitor of every keyed process."""
    h = Harness(broker_url, tmp, n=n, app="tests.restart_app")
    monitor = Monitor(h.journal_dir)
    monitor.start()
    try:
        yield h.start(), monitor
    finally:
        orphans = h.stop()
        violations = monitor.finish()
        assert not orphans, f"orphan processes left: {orphans}"
        assert not violations, violations


def of(received: list[dict[str, Any]], kind: str, key: str) -> list[dict[str, Any]]:
    return [e for e in received if e.get("type") == kind and e.get("key") == key]


def end(h: Harness, ref: KeyRef, how: str) -> None:
    if how == "stop":
        ref.stop(timeout=10)
    elif how == "normal":
        ref.send("exit")
    elif how == "crash":
        ref.send("crash")
    else:
        os.kill(ref.pid, signal.SIGKILL)


def next_process(h: Harness, name: str, key: str, old: KeyRef, timeout: float = 15.0) -> KeyRef:
    """The key's process after ``old``, once the leader lists it (never asks it to start)."""
    def restarted() -> KeyRef | None:
        try:
            ref = h.forseti.search_key(key, name=name, timeout=5)
        except ForsetiTimeout:  # a leader still taking over (failover): ask again until the deadline
            return None
        return ref if ref is not None and ref.pid != old.pid else None
    return wait_for(restarted, timeout, 0.02, lambda: f"{key!r} ({name}) never restarted\n{h.cluster.log_tails()}")


def restarts_listed(h: Harness, name: str, key: str) -> int | None:
    """The key's restart count as ``celery inspect forseti_keys`` lists it (None: not listed)."""
    for body in ask(h, "forseti_keys", [w.hostname for w in h.cluster.workers]).values():
        for k in body.get("keys", ()):
            if (k["name"], k["key"]) == (name, key):
                return int(k["restarts"])
    return None


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_each_policy_restarts_after_exactly_the_ends_it_names_with_the_same_args(
        broker: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    with restart_cluster(request.getfixturevalue(f"{broker}_url"), tmp_path, 2) as (h, monitor), \
            events(h) as received:
        refs = {(policy, how): h.forseti.get_key(fresh(f"{policy}-{how}"), name=policy, args=(policy, [how]),
                                                 timeout=20)
                for policy, how in RESTARTED}
        ended_at = {}
        for (policy, how), ref in refs.items():
            end(h, ref, how)
            ended_at[policy, how] = time.time()
        for (policy, how), ref in refs.items():
            if RESTARTED[policy, how]:
                new = next_process(h, policy, ref.key, ref)
                assert new.call("args", timeout=10) == {"args": [policy, [how]], "pid": new.pid}
                assert not alive(ref.pid)
                (event,) = wait_for(lambda ref=ref: of(received, "forseti-process-restarted", ref.key), 10)
                assert (event["name"], event["node"], event["child_pid"], event["restarts"]) == (
                    policy, new.node, new.pid, 1)
                assert event["reason"].startswith({"kill": "killed by signal 9", "crash": "crash: RuntimeError",
                                                   "normal": "normal"}[how])
                assert wait_for(lambda p=policy, k=ref.key: restarts_listed(h, p, k), 10) == 1
        # The ends no policy restarts: after the longest back-off of a first restart (0.1 s) and
        # the time the restarted ones took, nothing came back, and nothing asked it to.
        time.sleep(1.0)
        for (policy, how), ref in refs.items():
            if not RESTARTED[policy, how]:
                assert h.forseti.search_key(ref.key, name=policy, timeout=5) is None, (policy, how)
                assert len(monitor.of_key(ref.key)) == 1, (policy, how)
                assert not of(received, "forseti-process-restarted", ref.key)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_past_max_restarts_within_the_window_the_key_stays_down_and_a_given_up_event_is_sent(
        broker: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    with restart_cluster(request.getfixturevalue(f"{broker}_url"), tmp_path, 2) as (h, monitor), \
            events(h) as received:
        key = fresh("fragile")
        ref = h.forseti.get_key(key, name="fragile", args=(1,), timeout=20)
        for n in (1, 2):  # max_restarts=2: two restarts, back-off 0.1 then 0.2 s
            ref.send("crash")
            ref = next_process(h, "fragile", key, ref)
            assert wait_for(lambda n=n: [e["restarts"] for e in of(received, "forseti-process-restarted", key)]
                            == list(range(1, n + 1)) or None, 10)
        ref.send("crash")
        (given_up,) = wait_for(lambda: of(received, "forseti-process-given-up", key), 10,
                               message=f"no given-up event\n{h.cluster.log_tails()}")
        assert (given_up["name"], given_up["restarts"]) == ("fragile", 2)
        assert given_up["reason"].startswith("crash: RuntimeError")
        time.sleep(1.0)  # more than the next back-off (0.4 s) would have been
        assert h.forseti.search_key(key, name="fragile", timeout=5) is None
        assert len(monitor.of_key(key)) == 3
        assert "stays down" in h.cluster.log_tails()


@pytest.mark.chaos
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_killed_workers_transient_and_permanent_keys_are_restarted_elsewhere_and_temporary_ones_not(
        broker: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    with restart_cluster(request.getfixturevalue(f"{broker}_url"), tmp_path, 3) as (h, monitor):
        hosts = [w.hostname for w in h.cluster.workers]
        leader = wait_one_leader(h, hosts)
        # Least-used placement spreads a policy's keys over the three workers: one of each is not on the leader.
        refs = {policy: [h.forseti.get_key(fresh(policy), name=policy, args=(policy,), timeout=20) for _ in range(3)]
                for policy in ("temporary", "transient", "permanent")}
        victim = next(host for host in hosts if host != leader)
        doomed = {policy: [r for r in rs if r.node == victim] for policy, rs in refs.items()}
        assert all(doomed.values()), doomed
        next(w for w in h.cluster.workers if w.hostname == victim).kill()
        for policy in ("transient", "permanent"):
            for ref in doomed[policy]:
                new = next_process(h, policy, ref.key, ref, timeout=30)
                assert new.node != victim and new.call("args", timeout=10)["args"] == [policy]
        for ref in doomed["temporary"]:
            assert h.forseti.search_key(ref.key, name="temporary", timeout=5) is None
            assert len(monitor.of_key(ref.key)) == 1


@pytest.mark.chaos
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_restart_in_its_back_off_survives_a_leader_failover_and_never_runs_twice(
        broker: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    with restart_cluster(request.getfixturevalue(f"{broker}_url"), tmp_path, 3) as (h, monitor):
        hosts = [w.hostname for w in h.cluster.workers]
        leader = wait_one_leader(h, hosts)
        key = fresh("stubborn")
        ref = h.forseti.get_key(key, name="stubborn", args=("s",), timeout=20)
        for _ in range(5):  # back-offs 0.1, 0.2, 0.4, 0.8, 1.6 s: the sixth is 3.2 s
            ref.send("crash")
            ref = next_process(h, "stubborn", key, ref)

        def restarted() -> int | None:
            table = (ask(h, "stats", [leader]).get(leader, {}).get("forseti") or {}).get("table") or {}
            return table.get("restarted") if table.get("restarted", 0) >= 6 else None
        ref.send("crash")
        wait_for(restarted, 5, 0.05, "the leader never ordered the sixth restart")
        held_by = set(hosts) - {leader}  # a restart is never held by the leader's own worker
        next(w for w in h.cluster.workers if w.hostname == leader).kill()
        new = next_process(h, "stubborn", key, ref, timeout=40)
        assert new.node in held_by and new.call("args", timeout=10)["args"] == ["s"]
        assert wait_for(lambda: restarts_listed(h, "stubborn", key), 10) == 6
        starts = [life.start for life in monitor.of_key(key)]
        assert len(starts) == 7
        # Each restart waited its back-off (a process crashed after it started, and was restarted
        # that long after its exit): 0.1 s doubling.
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(gap >= backoff for gap, backoff in zip(gaps, [0.1, 0.2, 0.4, 0.8, 1.6, 3.2], strict=True)), gaps


@pytest.mark.chaos
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_killed_leaders_own_transient_keys_are_restarted_by_its_successor(
        broker: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """No other worker's report lists them: the successor knows them from the leader's heartbeats."""
    with restart_cluster(request.getfixturevalue(f"{broker}_url"), tmp_path, 2) as (h, monitor):
        hosts = [w.hostname for w in h.cluster.workers]
        leader = wait_one_leader(h, hosts)
        refs = [h.forseti.get_key(fresh("transient"), name="transient", args=(i,), timeout=20) for i in range(4)]
        temporary = [h.forseti.get_key(fresh("temporary"), name="temporary", timeout=20) for _ in range(2)]
        doomed = [r for r in refs if r.node == leader]
        assert doomed and any(r.node == leader for r in temporary), (leader, refs, temporary)
        time.sleep(1.5)  # a few heartbeats: the leader's last ones list its keys
        next(w for w in h.cluster.workers if w.hostname == leader).kill()
        for ref in doomed:
            new = next_process(h, "transient", ref.key, ref, timeout=40)
            assert new.node != leader and new.call("args", timeout=10)["args"] == [refs.index(ref)]
        for ref in temporary:
            if ref.node == leader:
                assert h.forseti.search_key(ref.key, name="temporary", timeout=5) is None
                assert len(monitor.of_key(ref.key)) == 1
