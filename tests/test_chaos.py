"""Chaos: kill, pause, cut off and restart real workers and brokers; never two live processes per key.

Every test runs a cluster of real ``celery worker`` processes (``tests.app``) under a
:class:`~tests.chaos_support.Monitor` that watches every keyed process the journal names: it fails
the test on one duplicate (two processes of one key alive at once) or one orphan (a process that
outlives the run). See docs/failure-model.rst for what is promised and why.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from forseti_celery import Forseti, ForsetiError, KeyRef
from forseti_celery.testing import WorkerProcess, wait_for

from .chaos_support import (
    Load,
    NetnsPair,
    PrivateRabbitMQ,
    PrivateRedis,
    ask,
    chaos,
    free_port,
    report,
    require,
    spread,
    timed,
    wait_consistent,
    wait_one_leader,
    wait_takeover,
)
from .helpers import Harness, alive, client_app

pytestmark = pytest.mark.chaos

#: Small timings keep the suite fast: fence_after = 2.5 - 2 * 0.3 = 1.9 s.
FAST = {"FORSETI_HEARTBEAT": "0.3", "FORSETI_NODE_TIMEOUT": "2.5", "FORSETI_LEASE": "1.5"}
#: A pause of the leader (its lease, or RabbitMQ's missed heartbeats, plus 2 s) stays below
#: fence_after (9.4 s): the paused worker keeps its processes.
STALE = {**FAST, "FORSETI_NODE_TIMEOUT": "10"}
#: A cut-off worker's processes end fence_after (2 s) after it last heard the broker, checked every
#: 0.5 s; the leader frees their keys after node_timeout (3 s): half a second to spare at worst.
PARTITION = {"FORSETI_HEARTBEAT": "0.5", "FORSETI_NODE_TIMEOUT": "3", "FORSETI_LEASE": "1.5"}


def restart(h: Harness, hostname: str) -> WorkerProcess:
    """Start a worker again under ``hostname``, and wait until *it* is ready."""
    # Same hostname, same log file (appended): the old incarnation's "ready." line is already there.
    log = h.cluster.worker(hostname).log_path
    readies = log.read_text(errors="replace").count(f"{hostname} ready.")
    worker = h.cluster.add_worker(hostname)
    wait_for(lambda: log.read_text(errors="replace").count(f"{hostname} ready.") > readies, 60, 0.05,
             f"{hostname} restarted but never became ready")
    return worker


def hosts_of(h: Harness) -> list[str]:
    return [w.hostname for w in h.cluster.workers if w.alive]


# --- 1. leader loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_leader_kill_under_load_serves_every_request_and_keeps_the_survivors_keys(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{broker}_url")
    with chaos(url, tmp_path, n=3, pool="prefork", **FAST) as (h, monitor):
        hosts = hosts_of(h)
        leader = wait_one_leader(h, hosts)
        refs = spread(h, "lk", 3, hosts)
        doomed = {k for k, r in refs.items() if r.node == leader}
        survivors = [host for host in hosts if host != leader]
        with Load(h.forseti, list(refs), threads=3, timeout=15.0) as load:
            load.wait_progress(30, 30)
            h.cluster.worker(leader).kill(signal.SIGKILL)
            killed = time.monotonic()
            # Under load, the dead leader's keys are asked for again and again: once every one of
            # them is answered from a survivor, the new leader serves.
            wait_for(lambda: {r.key for r in load.since(killed) if r.op == "get" and r.ref is not None
                              and r.ref.node != leader} >= doomed, 30, 0.1, "the dead leader's keys never came back")
            load.wait_progress(30, 30)
        requests = load.requests
        errors = [(r.op, r.key, repr(r.error)) for r in requests if r.error is not None]
        assert not errors, f"{len(errors)} of {len(requests)} requests failed: {errors[:5]}"
        assert max(r.took for r in requests) < load.timeout
        after = [r for r in requests if r.sent >= killed]
        handover = [r for r in requests if r.done >= killed]  # in flight at the kill, or sent after it
        for r in requests:
            if r.key not in doomed:  # on a survivor: same node and pid, before, during and after
                assert r.ref == refs[r.key], f"{r.op} {r.key!r} answered {r.ref}, not {refs[r.key]}"
        stale = [r for r in after if r.ref is not None and r.ref.node == leader]
        assert not stale, f"answered with the dead leader's processes after the kill: {stale[:3]}"
        report(f"leader kill ({broker})", requests=len(requests), after_kill=len(handover),
               slowest_across_the_handover=max(r.took for r in handover))
        assert not any(alive(refs[k].pid) for k in doomed), "the dead leader's children outlived it"
        assert wait_one_leader(h, survivors) in survivors
        for key in sorted(doomed):
            again = h.forseti.get_key(key)
            assert again.node in survivors and again.call("pid") == again.pid
        for key in sorted(set(refs) - doomed):
            assert refs[key].call("pid") == refs[key].pid
        wait_consistent(h, survivors, monitor)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_graceful_leader_stop_hands_over_without_waiting_for_the_lease(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{broker}_url")
    lease = 8.0  # far longer than a handover: waiting for it would show
    with chaos(url, tmp_path, n=3, **{**FAST, "FORSETI_LEASE": str(lease)}) as (h, monitor):
        hosts = hosts_of(h)
        leader = wait_one_leader(h, hosts)
        survivors = [host for host in hosts if host != leader]
        refs = spread(h, "gs", 2, hosts)
        leaving = {k for k, r in refs.items() if r.node == leader}
        token = _lease_holder(url, h) if broker == "redis" else None
        with Load(h.forseti, list(refs), threads=3, timeout=15.0) as load:
            load.wait_progress(30, 30)
            stopping = time.monotonic()
            assert h.cluster.worker(leader).stop() == 0
            stopped = time.monotonic()
            if token is not None:  # released at shutdown, so another worker holds it at once
                wait_for(lambda: _lease_holder(url, h) not in (None, token), lease / 2, 0.05,
                         "the leader lease was not released at shutdown")
            wait_for(lambda: {r.key for r in load.since(stopped) if r.ref is not None and r.ref.node != leader}
                     >= leaving, 20, 0.1, "the stopped leader's keys never came back")
            load.wait_progress(30, 30)
        errors = [(r.op, r.key, repr(r.error)) for r in load.requests if r.error is not None]
        assert not errors, f"{len(errors)} of {len(load.requests)} requests failed: {errors[:5]}"
        handover = max(r.took for r in load.requests if r.done >= stopping)
        report(f"graceful leader stop ({broker})", shutdown=stopped - stopping, slowest_request=handover)
        assert handover < lease / 2, f"a request waited {handover:.1f} s: the handover waited for the lease"
        for r in load.requests:
            if r.key not in leaving:
                assert r.ref == refs[r.key], f"{r.op} {r.key!r} answered {r.ref}, not {refs[r.key]}"
        terminated = {e["key"]: e["reason"] for e in h.journal() if e["ev"] == "terminate"}
        assert {k: "shutdown" for k in leaving}.items() <= terminated.items()
        assert wait_one_leader(h, survivors) in survivors
        wait_consistent(h, survivors, monitor)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_graceful_worker_stop_frees_its_keys_only_once_their_processes_have_exited(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{broker}_url")
    linger = 1.5  # each process takes this long in terminate(): still alive, still the key's process
    with chaos(url, tmp_path, n=3, **FAST) as (h, monitor):
        hosts = hosts_of(h)
        leader = wait_one_leader(h, hosts)
        leaving = next(host for host in hosts if host != leader)
        refs = {f"gw-{i}": h.forseti.get_key(f"gw-{i}", [linger], name="lingering") for i in range(6)}
        theirs = {k for k, r in refs.items() if r.node == leaving}
        assert theirs
        with Load(h.forseti, list(refs), threads=3, timeout=15.0, ops=("get",), name="lingering",
                  args=(linger,)) as load:
            load.wait_progress(10, 20)
            stopping = time.monotonic()
            assert h.cluster.worker(leaving).stop() == 0
            wait_for(lambda: {r.key for r in load.since(stopping) if r.ref is not None and r.ref.node != leaving}
                     >= theirs, 20, 0.1, "the stopped worker's keys never came back")
        errors = [(r.key, repr(r.error)) for r in load.requests if r.error is not None]
        assert not errors, f"{len(errors)} of {len(load.requests)} requests failed: {errors[:5]}"
        for key in theirs:
            old, *new = monitor.of_key(key)
            assert old.pid == refs[key].pid and old.ended is not None, "terminate() did not run"
            assert not new or new[0].start >= old.end_lo, (
                f"{key!r} started again at {new[0].start:.3f}, {old.end_lo - new[0].start:.2f} s before "
                f"its process ended")


def _lease_holder(url: str, h: Harness) -> bytes | None:
    with redis.Redis.from_url(url) as r:
        value: bytes | None = r.get(f"{h.namespace}:leader")
        return value


# --- 2. worker loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_worker_kill_takes_its_children_frees_its_keys_and_a_restart_is_reconciled(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{broker}_url")
    # node_timeout 6: a worker restarted at once is back before its old self is declared dead.
    with chaos(url, tmp_path, n=3, pool="prefork", **{**FAST, "FORSETI_NODE_TIMEOUT": "6"}) as (h, monitor):
        hosts = hosts_of(h)
        leader = wait_one_leader(h, hosts)
        first, second = [host for host in hosts if host != leader]
        refs = spread(h, "wk", 3, hosts)

        doomed = {k for k, r in refs.items() if r.node == first}
        h.cluster.worker(first).kill(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: not any(alive(refs[k].pid) for k in doomed), 5.0, 0.02,
                 "the killed worker's children outlived it")
        died = time.monotonic() - killed
        wait_for(lambda: all(h.forseti.search_key(k, timeout=5) is None for k in doomed), 10.0, 0.1,
                 "the killed worker's keys were not freed within 10 s")
        freed = time.monotonic() - killed
        for key in sorted(doomed):
            refs[key] = h.forseti.get_key(key)
            assert refs[key].node in (leader, second) and refs[key].call("pid") == refs[key].pid
        report(f"worker kill ({broker})", children_gone=died, keys_freed=freed)

        # Killed and restarted at once under the same hostname: the old incarnation leaves nothing.
        old = {k: r for k, r in refs.items() if r.node == second}
        assert old
        h.cluster.worker(second).kill(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: not any(alive(r.pid) for r in old.values()), 5.0, 0.02,
                 "the killed worker's children outlived it")
        reborn = restart(h, second)
        back = time.monotonic() - killed
        h.wait_members(2)
        wait_for(lambda: all(h.forseti.search_key(k, timeout=5) != r for k, r in old.items()), 10.0, 0.1,
                 "keys still point at the dead incarnation's processes")
        report(f"worker restart ({broker})", back_after=back)
        live = [w.hostname for w in h.cluster.workers if w.alive]
        wait_consistent(h, live, monitor)
        # Nothing stale counts against it: the reborn worker is the least used and gets the next key.
        fresh = h.forseti.get_key("wk-after-restart")
        assert fresh.node == second and fresh.pid in reborn.descendants()
        for key, ref in refs.items():
            if key not in old:
                assert h.forseti.search_key(key) == ref


# --- 3. late joiner ------------------------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_late_joiner_is_eligible_at_once_and_takes_the_next_key(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{broker}_url")
    with chaos(url, tmp_path, n=3, **FAST) as (h, monitor):
        hosts = hosts_of(h)
        refs = spread(h, "lj", 2, hosts)
        name = hosts[0].replace("w1-", "w4-", 1)
        joiner = h.cluster.add_worker(name)
        ready = time.monotonic()
        metrics = h.wait_members(4, timeout=10)
        report(f"late joiner ({broker})", eligible_after_ready=time.monotonic() - ready)
        assert metrics[name] == 0
        ref = h.forseti.get_key("lj-new")
        assert ref.node == name and ref.pid in joiner.descendants() and ref.call("key") == "lj-new"
        everyone = [*hosts, name]
        stats = {host: s["forseti"] for host, s in ask(h, "stats", everyone).items()}
        assert set(stats[name]["members"]) == set(everyone), "the joiner does not know the cluster"
        # A leader elected after the join rebuilds a table that has the joiner's key too.
        leader = wait_one_leader(h, everyone)
        h.cluster.worker(leader).kill(signal.SIGKILL)
        survivors = [host for host in everyone if host != leader]
        wait_one_leader(h, survivors)
        assert h.forseti.search_key("lj-new") == ref
        for key, r in refs.items():
            assert h.forseti.search_key(key) == (r if r.node != leader else None)
        wait_consistent(h, survivors, monitor)


# --- 4. broker restart ----------------------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_broker_restart_keeps_the_children_and_the_table_and_clients_fail_fast_meanwhile(
    broker: str, tmp_path: Path
) -> None:
    if broker == "redis":
        require("redis-server")
        server: PrivateRedis | PrivateRabbitMQ = PrivateRedis(tmp_path / "redis")
        # fence_after 11.4 s: longer than the outage (3 s) plus reconnection (kombu retries every ~4 s).
        env = {**FAST, "FORSETI_NODE_TIMEOUT": "12"}
    else:
        require("rabbitmq-server")
        server = PrivateRabbitMQ(tmp_path / "rabbitmq")
        # A RabbitMQ node takes ~8 s to boot here: fence_after 29 s covers the outage and the boot.
        env = {"FORSETI_HEARTBEAT": "0.5", "FORSETI_NODE_TIMEOUT": "30", "FORSETI_LEASE": "2"}
    outage = 3.0
    server.start()
    try:
        with chaos(server.url, tmp_path, n=3, **env) as (h, monitor):
            hosts = hosts_of(h)
            wait_one_leader(h, hosts)
            refs = spread(h, "br", 2, hosts)
            server.kill()
            down = time.monotonic()
            with ThreadPoolExecutor(3) as pool:  # clients keep asking during the outage
                asked = [pool.submit(timed, call) for call in (
                    lambda: h.forseti.get_key("br-0", timeout=2), lambda: h.forseti.search_key("br-1", timeout=2),
                    lambda: h.forseti.get_key("br-new", timeout=2))]
                time.sleep(outage)  # the outage itself
                assert all(alive(r.pid) for r in refs.values()), "keyed processes died with the broker"
                server.start()
                up = time.monotonic()
                outcomes = [f.result(timeout=30) for f in asked]  # an error or an answer: never a hang
            for took, value, error in outcomes:
                if down + took < up:
                    assert isinstance(error, ForsetiError), f"answered {value!r} with the broker down"
            last: list[str] = []
            wait_for(lambda: _all_answer(h, refs, last), 60, 0.2,
                     lambda: f"clients never got the same processes back: {last}")
            report(f"broker restart ({broker})", down_for=up - down, served_again_after=time.monotonic() - up,
                   slowest_client_during_outage=max(took for took, _, _ in outcomes))
            wait_one_leader(h, hosts)
            for key, ref in refs.items():
                assert h.forseti.get_key(key) == ref and ref.call("pid") == ref.pid
            fresh = h.forseti.get_key("br-after")
            assert fresh.call("key") == "br-after"
            wait_consistent(h, hosts, monitor)
    finally:
        server.close()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_broker_restart_with_one_worker_back_late_is_served_again(broker: str, tmp_path: Path) -> None:
    require("redis-server" if broker == "redis" else "rabbitmq-server")
    if broker == "redis":
        server: PrivateRedis | PrivateRabbitMQ = PrivateRedis(tmp_path / "redis")
    else:
        server = PrivateRabbitMQ(tmp_path / "rabbitmq")
    # fence_after 29 s: the outage, a RabbitMQ boot and the late worker's pause all fit in it.
    env = {"FORSETI_HEARTBEAT": "0.5", "FORSETI_NODE_TIMEOUT": "30", "FORSETI_LEASE": "2"}
    server.start()
    try:
        with chaos(server.url, tmp_path, n=3, **env) as (h, monitor):
            hosts = hosts_of(h)
            leader = wait_one_leader(h, hosts)
            late = next(host for host in hosts if host != leader)
            refs = spread(h, "bl", 2, hosts)
            # One worker is stopped through the restart, so the others are back first and one of
            # them takes the role (and asks everyone, the late one too, for its registry) before
            # the late one has reconnected (on RabbitMQ, before its queue exists again).
            h.cluster.worker(late).kill(signal.SIGSTOP)
            try:
                server.kill()
                server.start()
                wait_takeover(h, [host for host in hosts if host != late], timeout=60)
                time.sleep(1.0)
            finally:
                h.cluster.worker(late).kill(signal.SIGCONT)
            resumed = time.monotonic()
            last: list[str] = []
            wait_for(lambda: _all_answer(h, refs, last), 20, 0.2,
                     lambda: f"clients never got the same processes back: {last}")
            report(f"broker restart, one worker back late ({broker})", served_after_resume=time.monotonic() - resumed)
            assert wait_one_leader(h, hosts) != late
            wait_consistent(h, hosts, monitor)
    finally:
        server.close()


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_broker_down_client_requests_fail_within_their_timeout(scheme: str) -> None:
    # Nothing listens on the port: the broker is down for this client from its first request on.
    url = f"redis://127.0.0.1:{free_port()}/0" if scheme == "redis" else f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    forseti = Forseti.of(client_app(url, f"forseti-down-{scheme}"))
    timeout = 2.0
    try:
        with ThreadPoolExecutor(2) as pool:  # two callers at once
            outcomes = list(pool.map(timed, [lambda: forseti.get_key("down", timeout=timeout),
                                             lambda: forseti.search_key("down", timeout=timeout)]))
    finally:
        forseti.client.close()
    for _, value, error in outcomes:
        assert isinstance(error, ForsetiError), f"answered {value!r} with no broker"
    assert max(took for took, _, _ in outcomes) < timeout + 1.0, [round(took, 1) for took, _, _ in outcomes]


def _all_answer(h: Harness, refs: dict[str, KeyRef], last: list[str]) -> bool:
    """Whether every key answers with its process; else why not, in ``last``."""
    try:
        wrong = {key: got for key, ref in refs.items() if (got := h.forseti.get_key(key, timeout=2)) != ref}
    except ForsetiError as exc:
        last[:] = [repr(exc)]
        return False
    last[:] = [f"{key!r} answered {got}, not {refs[key]}" for key, got in wrong.items()]
    return not wrong


# --- 5. stale leader ----------------------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_stale_leader_resumed_after_a_takeover_has_its_orders_refused(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{broker}_url")
    # w1 starts first and leads, and is not eligible: it holds no process, so only its orders matter.
    # Paused past its lease (RabbitMQ: past two missed connection heartbeats) but not past
    # fence_after (9.4 s), then resumed.
    with chaos(url, tmp_path, n=1, start=False, **STALE) as (h, monitor):
        leader = h.cluster.workers[0].hostname
        others = [leader.replace("w1-", f"w{i}-", 1) for i in (2, 3)]
        for env in (h.env, h.cluster.env, h.cluster.workers[0].env):
            env["FORSETI_NODES"] = ",".join(others)
        h.cluster.start()
        assert wait_one_leader(h, [leader]) == leader
        for host in others:
            h.cluster.add_worker(host)
        h.wait_members(2)
        hosts = [leader, *others]
        stale = h.cluster.worker(leader)
        # New keys all along: requests sent as the leader stops reach it (a BRPOP in flight, RabbitMQ
        # deliveries already in its socket) and wait there until it resumes, deposed.
        keys = [f"sr-{i}" for i in range(150)]
        with Load(h.forseti, keys, threads=3, timeout=15.0, ops=("get",)) as load:
            load.wait_progress(6, 20)
            stale.kill(signal.SIGSTOP)
            paused = time.monotonic()
            try:
                successor = wait_takeover(h, others)
                took_over = time.monotonic() - paused
                time.sleep(2.0)  # the successor holds the role while the old leader is still paused
            finally:
                stale.kill(signal.SIGCONT)
            resumed = time.monotonic()
            load.wait_progress(30, 30)
        assert resumed - paused < 9.4, "paused past fence_after: the test proves nothing"
        refused = sum(w.log_text().count("refused spawn") for w in h.cluster.workers)
        report(f"stale leader ({broker})", took_over_after=took_over, paused_for=resumed - paused, refused=refused)
        errors = [(r.key, repr(r.error)) for r in load.requests if r.error is not None]
        assert not errors, f"{len(errors)} of {len(load.requests)} requests failed: {errors[:5]}"
        answers: dict[str, set[KeyRef | None]] = {}
        for r in load.requests:
            answers.setdefault(r.key, set()).add(r.ref)
        changed = {k: v for k, v in answers.items() if len(v) > 1}
        assert not changed, f"keys answered with more than one process: {changed}"
        assert wait_one_leader(h, hosts) == successor
        wait_consistent(h, hosts, monitor)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_stale_leader_resumed_after_being_declared_dead_starts_nothing(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{broker}_url")
    with chaos(url, tmp_path, n=3, **FAST) as (h, monitor):
        hosts = hosts_of(h)
        leader = wait_one_leader(h, hosts)
        others = [host for host in hosts if host != leader]
        # The leader holds no process: the least used worker in its own table, and nothing to fence.
        for ref in [h.forseti.get_key(f"sd-{i}") for i in range(3)]:
            if ref.node == leader:
                ref.stop()
        stale = h.cluster.worker(leader)
        keys = [f"sd-new-{i}" for i in range(150)]
        with Load(h.forseti, keys, threads=3, timeout=15.0, ops=("get",)) as load:
            load.wait_progress(6, 20)
            stale.kill(signal.SIGSTOP)  # requests sent now wait in its socket (or its BRPOP) for it
            paused = time.monotonic()
            try:
                # Paused past node_timeout: declared dead, its keys free, a successor serves.
                assert wait_one_leader(h, others, timeout=30) in others
                time.sleep(1.0)
            finally:
                stale.kill(signal.SIGCONT)
            resumed = time.monotonic()
            load.wait_progress(30, 30)
        report(f"stale leader declared dead ({broker})", paused_for=resumed - paused)
        errors = [(r.key, repr(r.error)) for r in load.requests if r.error is not None]
        assert not errors, f"{len(errors)} of {len(load.requests)} requests failed: {errors[:5]}"
        h.wait_members(3)
        wait_one_leader(h, hosts)
        wait_consistent(h, hosts, monitor)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_paused_leader_keeps_its_keys_while_a_successor_takes_over(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{broker}_url")
    with chaos(url, tmp_path, n=3, **STALE) as (h, monitor):
        hosts = hosts_of(h)
        leader = wait_one_leader(h, hosts)
        others = [host for host in hosts if host != leader]
        refs = spread(h, "pl", 2, hosts)
        paused_worker = h.cluster.worker(leader)
        # Clients ask for every key (and new ones) before, during and after the pause: the old
        # leader's processes still run, so its keys are not free; the successor must wait for its
        # report (or its death, which comes after it fenced itself).
        keys = [*refs, *(f"pl-new-{i}" for i in range(6))]
        with Load(h.forseti, keys, threads=3, timeout=15.0, ops=("get",)) as load:
            load.wait_progress(6, 20)
            paused_worker.kill(signal.SIGSTOP)
            paused = time.monotonic()
            try:
                wait_takeover(h, others)
                time.sleep(2.0)  # the successor holds the role while the old leader is still paused
            finally:
                paused_worker.kill(signal.SIGCONT)
            resumed = time.monotonic()
            wait_for(lambda: {r.key for r in load.since(resumed) if r.ref is not None} >= set(keys), 30, 0.1,
                     "clients were not served after the old leader resumed")
        assert resumed - paused < 9.4, "paused past fence_after: the test proves nothing"
        errors = [(r.key, repr(r.error)) for r in load.requests if r.error is not None]
        assert not errors, f"{len(errors)} of {len(load.requests)} requests failed: {errors[:5]}"
        for r in load.requests:
            if r.key in refs:  # nobody died: every key keeps its process
                assert r.ref == refs[r.key], f"{r.key!r} answered {r.ref} instead of {refs[r.key]}"
        wait_one_leader(h, hosts)
        wait_consistent(h, hosts, monitor)


# --- 6. partition --------------------------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_partitioned_worker_fences_its_children_before_the_leader_frees_their_keys(
    broker: str, tmp_path: Path
) -> None:
    require("ip", "redis-server" if broker == "redis" else "rabbitmq-server", root=True)
    with NetnsPair() as net, net.inside(net.a):
        # The broker, two workers and this test's client in namespace a; one worker in b.
        if broker == "redis":
            server: PrivateRedis | PrivateRabbitMQ = PrivateRedis(tmp_path / "redis", bind=(net.A_ADDR, "127.0.0.1"))
        else:
            server = PrivateRabbitMQ(tmp_path / "rabbitmq", host=net.A_ADDR)
        server.start()
        try:
            with chaos(server.url, tmp_path, n=2, **PARTITION) as (h, monitor):
                hosts = hosts_of(h)
                wait_one_leader(h, hosts)  # in a: the isolated worker joins later, and never leads
                name = hosts[0].replace("w1-", "w3-", 1)
                with net.inside(net.b):
                    h.cluster.add_worker(name)
                h.wait_members(3)
                refs = spread(h, "pt", 2, [*hosts, name])
                cut_off = {k for k, r in refs.items() if r.node == name}
                with Load(h.forseti, list(refs), threads=3, timeout=15.0, ops=("get",)) as load:
                    load.wait_progress(20, 20)
                    net.cut()
                    cut = time.monotonic()
                    wait_for(lambda: {r.key for r in load.since(cut) if r.ref is not None and r.ref.node != name}
                             >= cut_off, 30, 0.1, "the isolated worker's keys never came back")
                    load.wait_progress(20, 20)
                errors = [(r.key, repr(r.error)) for r in load.requests if r.error is not None]
                assert not errors, f"{len(errors)} of {len(load.requests)} requests failed: {errors[:5]}"
                assert not any(alive(refs[k].pid) for k in cut_off), "the isolated worker's children still run"
                margins = []
                for key in cut_off:
                    lives = monitor.of_key(key)
                    assert len(lives) >= 2 and lives[0].pid == refs[key].pid, lives
                    assert lives[0].gone is not None
                    margins.append(lives[1].start - lives[0].gone)
                report(f"partition ({broker})", fence_margin_min=min(margins))
                for key in set(refs) - cut_off:
                    assert h.forseti.search_key(key) == refs[key]
                net.heal()
                h.wait_members(3, timeout=30)
                wait_consistent(h, [*hosts, name], monitor, timeout=30)
        finally:
            server.close()
