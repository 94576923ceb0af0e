"""Worker life: pools, shutdown, SIGKILL, broker reconnects, many client processes, transports."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from forseti_celery import Forseti, KeyRef
from forseti_celery.testing import wait_for

from .conftest import REDIS_CLAIM_NAME
from .helpers import ROOT, Harness, alive, client_app, harness


@pytest.mark.parametrize("pool", ["solo", "threads", "prefork"])
def test_every_pool_runs_keyed_processes_and_get_key_inside_a_task(
    pool: str, redis_url: str, tmp_path: Path
) -> None:
    # One worker: it is the leader and the chosen node of the get_key made by its own task.
    with harness(redis_url, tmp_path, n=1, pool=pool) as h:
        key = f"{pool}-task"
        from_task = h.app.send_task("tests.app.lookup", args=[key]).get(timeout=20)
        assert isinstance(from_task, KeyRef) and from_task.node == h.cluster.workers[0].hostname
        assert h.forseti.get_key(key) == from_task
        assert from_task.call("get") == 0
        assert from_task.pid in h.cluster.workers[0].descendants()
        from_task.stop()


def test_warm_shutdown_runs_terminate_and_frees_the_keys(rabbitmq_url: str, tmp_path: Path) -> None:
    with harness(rabbitmq_url, tmp_path, n=2) as h:
        refs = [h.forseti.get_key(f"warm-{i}") for i in range(6)]
        leaving = h.cluster.workers[1]
        mine = [r for r in refs if r.node == leaving.hostname]
        assert mine
        leaving.stop()
        terminated = {e["key"]: e["reason"] for e in h.journal() if e["ev"] == "terminate"}
        assert {r.key: "shutdown" for r in mine}.items() <= terminated.items()
        assert not any(alive(r.pid) for r in mine)
        wait_for(lambda: all(h.forseti.search_key(r.key) is None for r in mine), 2.0)
        again = h.forseti.get_key(mine[0].key)
        assert again.node == h.cluster.workers[0].hostname
        for r in refs:
            r.stop()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_sigkill_of_a_worker_takes_its_children_and_frees_their_keys(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{broker}_url")
    with harness(url, tmp_path, n=3) as h:
        refs = [h.forseti.get_key(f"sigkill-{i}") for i in range(9)]
        victim = next(w for w in h.cluster.workers if w.hostname == refs[-1].node)
        doomed = [r for r in refs if r.node == victim.hostname]
        victim.kill(signal.SIGKILL)
        wait_for(lambda: not any(alive(r.pid) for r in doomed), 5.0, message="children outlived their worker")
        survivors = [r for r in refs if r.node != victim.hostname]
        # The client's cached refs to the dead worker go with the leader's node-lost event.
        moved = wait_for(lambda: (r := h.forseti.get_key(doomed[-1].key)).node != victim.hostname and r, 15.0,
                         message="get_key kept answering a process of the dead worker")
        assert moved.call("get") == 0
        wait_for(lambda: all(h.forseti.search_key(r.key) is None for r in doomed[:-1]), 15.0,
                 message="the dead worker's keys were not freed")
        assert [h.forseti.search_key(r.key) for r in survivors] == survivors
        again = h.forseti.get_key(doomed[0].key)
        assert again.node != victim.hostname and again.call("get") == 0
        for r in [*survivors, again, moved]:
            r.stop()


@pytest.mark.parametrize("zygote", ["fork", "exec"])
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_children_of_a_stopped_worker_end_themselves_before_their_keys_move(
    broker: str, zygote: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{broker}_url")
    with harness(url, tmp_path, n=2, FORSETI_ZYGOTE=zygote) as h:
        refs = [h.forseti.get_key(f"sigstop-{i}") for i in range(4)]
        frozen = next(w for w in h.cluster.workers if w.hostname == refs[-1].node)
        mine = [r for r in refs if r.node == frozen.hostname]
        frozen.kill(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            wait_for(lambda: not any(alive(r.pid) for r in mine), 10.0,
                     message="children of a stopped worker kept running")
            gone_after = time.monotonic() - t0
            # Cached refs go with the leader's node-lost event, once the worker is declared dead.
            wait_for(lambda: (r := _get_quietly(h, mine[0].key)) and r.node != frozen.hostname and r, 20.0)
            # No instant with two processes: the old one had ended before the key moved.
            assert not alive(mine[0].pid) and gone_after < 4 - 2 * 0.5 + 1.5
        finally:
            frozen.kill(signal.SIGCONT)
        wait_for(lambda: len(h.forseti.get_metrics(timeout=2)) == 2, 20.0, message="the worker did not come back")
        held = {host: s["forseti"]["total"] for host, s in
                (h.app.control.inspect([w.hostname for w in h.cluster.workers], timeout=2).stats() or {}).items()}
        wait_for(lambda: h.forseti.get_metrics() == held, 10.0)
        for r in refs:
            current = h.forseti.search_key(r.key)
            if current is not None:
                current.stop()


def _get_quietly(h: Harness, key: str) -> KeyRef | None:
    try:
        return h.forseti.get_key(key, timeout=2)
    except Exception:
        return None


def test_children_survive_a_broker_reconnect_of_their_worker(redis_url: str, tmp_path: Path) -> None:
    with harness(redis_url, tmp_path, n=2) as h:
        refs = [h.forseti.get_key(f"reconnect-{i}") for i in range(4)]
        with redis.Redis.from_url(redis_url) as r:
            # Only this test's database: other clients of the shared server are left alone.
            db = r.connection_pool.connection_kwargs.get("db", 0)
            ours = [c["id"] for c in r.client_list() if int(c["db"]) == db and c["name"] != REDIS_CLAIM_NAME]
            killed = sum(r.client_kill_filter(_id=cid) for cid in ours)
        assert killed > 0
        for ref in refs:
            assert wait_for(lambda ref=ref: _call_quietly(ref), 15.0) == ["echo", "still here"]
        assert [h.forseti.search_key(ref.key) for ref in refs] == refs
        for ref in refs:
            ref.stop()


def _call_quietly(ref: KeyRef) -> object:
    try:
        return ref.call("still here", timeout=1)
    except Exception:
        return None


def _hammer(args: tuple[str, str, list[str], int]) -> list[list[object]]:
    broker_url, namespace, keys, rounds = args
    forseti = Forseti.of(client_app(broker_url, namespace))
    out = []
    for _ in range(rounds):
        for key in keys:
            ref = forseti.get_key(key)
            out.append([ref.key, ref.node, ref.pid])
    forseti.close()
    return out


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_concurrent_get_key_from_four_client_processes_starts_each_key_once(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{broker}_url")
    with harness(url, tmp_path, n=3) as h:
        keys = [f"hammer-{i}" for i in range(25)]
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(4) as pool:
            results = pool.map(_hammer, [(url, h.namespace, keys[::step], 3) for step in (1, -1, 1, -1)])
        seen: dict[str, set[tuple[str, int]]] = {}
        for result in results:
            for key, node, pid in result:
                seen.setdefault(str(key), set()).add((str(node), int(pid)))  # type: ignore[call-overload]
        assert all(len(refs) == 1 for refs in seen.values()), {k: v for k, v in seen.items() if len(v) > 1}
        for key in keys:
            assert len(h.starts(key)) == 1, h.starts(key)
        assert sorted(h.forseti.get_metrics().values()) == [8, 8, 9]
        for key in keys:
            ref = h.forseti.search_key(key)
            assert ref is not None
            ref.stop()


def test_forseti_nodes_limits_placement(redis_url: str, tmp_path: Path) -> None:
    h = Harness(redis_url, tmp_path, n=3)
    eligible = [w.hostname for w in h.cluster.workers[:2]]
    h.env["FORSETI_NODES"] = ",".join(eligible)
    for w in h.cluster.workers:
        w.env.update(h.env)
    try:
        h.cluster.start()
        h.wait_members(2)
        refs = [h.forseti.get_key(f"eligible-{i}") for i in range(6)]
        assert {r.node for r in refs} == set(eligible)
        assert sorted(h.forseti.get_metrics()) == sorted(eligible)
        for r in refs:
            r.stop()
    finally:
        assert not h.stop()


def test_a_transport_without_election_is_refused_at_worker_start(tmp_path: Path) -> None:
    env = {**os.environ, "FORSETI_BROKER_URL": "filesystem://", "FORSETI_FS_FOLDER": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.app", "worker", "-P", "solo", "-n", "fs@x",
         "--without-mingle", "--without-gossip", "--without-heartbeat"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "forseti_celery needs a RabbitMQ (amqp) or Redis broker" in proc.stdout + proc.stderr


def _started_at(pid: int) -> float:
    """When ``pid`` started, in seconds since boot (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


@pytest.mark.parametrize("spares", [2, 0])
def test_a_new_key_goes_to_a_spare_forked_ahead_or_to_a_fork_on_demand(
    spares: int, redis_url: str, tmp_path: Path
) -> None:
    with harness(redis_url, tmp_path, n=1, FORSETI_SPARES=str(spares)) as h:
        worker = h.cluster.workers[0]

        def stats() -> dict[str, object]:
            try:
                replies = h.app.control.inspect(destination=[worker.hostname], timeout=2).stats() or {}
            except redis.exceptions.ConnectionError:  # a pooled connection found closed: ask again
                return {}
            return dict(replies.get(worker.hostname, {}).get("forseti", {}))

        wait_for(lambda: stats().get("spares") == spares, 20, 0.1, "the worker never had its spares")
        time.sleep(0.3)
        asked = _uptime()
        ref = h.forseti.get_key("spare-1")
        assert ref.call("get") == 0 and ref.pid in worker.descendants()
        if spares:
            assert _started_at(ref.pid) < asked - 0.1, "the key's process was forked on demand"
            # Spares are no keyed processes: not counted; and another one is forked behind it.
            assert h.forseti.get_metrics() == {worker.hostname: 1}
            wait_for(lambda: stats().get("spares") == spares and stats().get("total") == 1, 10, 0.1)
            # Forked by the worker's zygote: it and every spare die with the worker.
            zygote = _parent_of(ref.pid)
            assert zygote != worker.pid and zygote in worker.descendants()
            # A burst larger than the spares: the zygote forks the rest on demand, too. Each one
            # collects its own garbage (the zygote itself runs without).
            with ThreadPoolExecutor(8) as pool:
                burst = list(pool.map(h.forseti.get_key, [f"burst-{i}" for i in range(8)]))
            assert {_parent_of(r.pid) for r in burst} == {zygote}
            assert all(r.call("gc") is True for r in [ref, *burst])
            family = worker.descendants()
            worker.kill(signal.SIGKILL)
            wait_for(lambda: not any(alive(pid) for pid in family), 10, 0.05,
                     lambda: f"outlived their worker: {[pid for pid in family if alive(pid)]}")
        else:
            assert _started_at(ref.pid) >= asked - 0.02
            assert _parent_of(ref.pid) == worker.pid
            assert ref.call("gc") is True
            ref.stop()


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
