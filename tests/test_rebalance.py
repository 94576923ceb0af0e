"""Rebalancing movable keys onto a new worker (issue 13), both brokers: ``forseti_rebalance="on_join"``
under traffic, ``celery forseti rebalance`` on demand, and the ``forseti_rebalance`` command's errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from forseti_celery.cli import EXIT_UNAVAILABLE, EXIT_USAGE
from forseti_celery.control import NOT_RUNNING, forseti_rebalance
from tests.handoff_support import APP, Traffic, check_counts, cli, message, state_cluster, wait_counts
from tests.helpers import ROOT, Harness

MOVED = re.compile(r"^(\S+) (\S+) (\S+) -> (\S+)$")


def create(h: Harness, n: int, prefix: str) -> list[str]:
    keys = [f"{prefix}-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    for key in keys:
        h.forseti.get_key(key, name="tally", timeout=30)
    return keys


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_third_worker_joining_with_on_join_takes_a_third_of_90_keys_under_traffic_and_nothing_is_lost(
        broker: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    with state_cluster(request.getfixturevalue(f"{broker}_url"), tmp_path, 2,
                       FORSETI_REBALANCE="on_join") as (h, _):
        keys = create(h, 90, "join")
        wait_counts(h, [45, 45])  # the leader counts a start once its worker's report arrives
        with Traffic(h, keys) as traffic:
            joined = h.cluster.add_worker()
            counts = wait_counts(h, [30, 30, 30])
            acked = traffic.finish()
        assert counts[joined.hostname] == 30
        assert not traffic.errors, traffic.errors
        states = check_counts(h, acked, keys, moved=False)
        # Each key the new worker runs moved there once, with its state; the others never moved.
        on_new = {k["key"] for k in keys_on(h, joined.hostname)}
        assert len(on_new) == 30
        assert {key for key, s in zip(keys, states, strict=True) if s["restored"]} == on_new
        assert all(len(s["incarnations"]) == 1 + (key in on_new) for key, s in zip(keys, states, strict=True))


def keys_on(h: Harness, host: str) -> list[dict[str, Any]]:
    replies = h.app.control.broadcast("forseti_keys", arguments={"name": "tally"}, destination=[host], reply=True,
                                      timeout=10, limit=1)
    return [k for reply in replies for k in reply[host]["keys"]]


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_celery_forseti_rebalance_moves_keys_onto_a_new_worker_with_their_state_and_prints_what_moved(
        broker: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    with state_cluster(request.getfixturevalue(f"{broker}_url"), tmp_path, 2) as (h, _):
        keys = create(h, 20, "demand")
        for i, key in enumerate(keys, 1):
            h.forseti.call(key, message("t", 1, i), name="tally")
        joined = h.cluster.add_worker()
        h.wait_members(3)
        before = h.forseti.get_metrics(timeout=10)
        assert before[joined.hostname] == 0 and sorted(before.values()) == [0, 10, 10]  # off: a join moves nothing

        done = cli(h, "rebalance", "--timeout", "60")
        lines = done.stdout.splitlines()
        moved = [MOVED.match(line).groups() for line in lines[:-1]]  # type: ignore[union-attr]
        assert len(moved) == 6 and lines[-1].startswith("6 keys moved (leader "), done.stdout
        assert {m[0] for m in moved} == {"tally"} and {m[3] for m in moved} == {joined.hostname}
        assert all(before[m[2]] == 10 for m in moved)
        after = h.forseti.get_metrics(timeout=10)
        assert sorted(after.values()) == [6, 7, 7] and after[joined.hostname] == 6
        for i, key in enumerate(keys, 1):
            state = h.forseti.call(key, "state", name="tally")
            assert state["count"] == i and state["restored"] == (key in {m[1] for m in moved})
            if key in {m[1] for m in moved}:
                assert h.forseti.search_key(key, name="tally").node == joined.hostname  # type: ignore[union-attr]

        again = json.loads(cli(h, "rebalance", "--json").stdout)
        assert again["moved"] == [] and again["namespace"] == h.namespace
        assert again["leader"] in {w.hostname for w in h.cluster.workers}
        assert "nothing to move" in cli(h, "rebalance").stdout

        # The command itself, sent to a worker that does not lead: refused, naming why.
        other = next(w.hostname for w in h.cluster.workers if w.hostname != again["leader"])
        (reply,) = h.app.control.broadcast("forseti_rebalance", arguments={"timeout": 5}, destination=[other],
                                           reply=True, timeout=10, limit=1)
        assert reply[other]["error"].startswith("not the leader: ")


def rebalance_cli(broker_url: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FORSETI_BROKER_URL": broker_url, "FORSETI_NAMESPACE": namespace}
    return subprocess.run([sys.executable, "-m", "celery", "-A", APP, "forseti", "rebalance", *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_celery_forseti_rebalance_without_a_leader_exits_3_and_a_bad_timeout_is_a_usage_error(redis_url: str) -> None:
    nobody = f"forseti-nobody{uuid.uuid4().hex[:6]}"
    done = rebalance_cli(redis_url, nobody, "--timeout", "1", "--json")
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    assert json.loads(done.stdout)["error"] == "no_answer" and nobody in done.stderr
    for bad in ("0", "-1", "soon"):
        usage = rebalance_cli(redis_url, nobody, "--timeout", bad)
        assert usage.returncode == EXIT_USAGE and "--timeout" in usage.stderr, usage.stderr
    assert rebalance_cli(redis_url, nobody, "extra").returncode == EXIT_USAGE


def test_the_rebalance_command_refuses_a_bad_timeout_a_worker_without_forseti_and_one_that_does_not_lead() -> None:
    def state(step: Any) -> Any:
        return SimpleNamespace(consumer=SimpleNamespace(controller=SimpleNamespace(forseti=step)))

    node = SimpleNamespace(hostname="w1@h", leader=SimpleNamespace(active=False),
                           settings=SimpleNamespace(namespace="ns"))
    for bad in (0, -2, "x", float("nan"), float("inf")):
        assert forseti_rebalance(state(None), bad)["error"].startswith("usage: forseti_rebalance [timeout]: ")
    assert forseti_rebalance(state(None)) == {"error": NOT_RUNNING}
    assert forseti_rebalance(state(SimpleNamespace(node=node)), 5)["error"].startswith(
        "not the leader: w1@h does not lead namespace 'ns'")
    node.leader.active = True
    assert forseti_rebalance(state(SimpleNamespace(node=node))) == {"error": "this worker's forseti cannot rebalance"}
    asked: list[float | None] = []

    moved = [{"name": "tally", "key": "k", "source": "w1@h", "target": "w2@h"}]

    def rebalance(timeout: float | None) -> list[dict[str, str]]:
        asked.append(timeout)
        return moved
    assert forseti_rebalance(state(SimpleNamespace(node=node, rebalance=rebalance)), "2.5") == {
        "ok": {"namespace": "ns", "node": "w1@h", "moved": moved}}
    assert asked == [2.5]
