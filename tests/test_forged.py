"""Forged messages against a real cluster, on both brokers: anyone who can write to the broker can
publish what a worker or a leader would, and none of it may free, kill, wedge or depose anything.
Each message is published with the project's own Publisher and codec, where the forger would put it
(the leader queue, a worker's queue, the heartbeat fanout)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions
from kombu.exceptions import OperationalError

from forseti_celery import Forseti, KeyRef
from forseti_celery.testing import wait_for

from .chaos_support import (
    PrivateRedis,
    forge,
    forged_exit,
    forged_heartbeat,
    forged_spawn,
    forged_start,
    require,
)
from .helpers import Harness, alive, client_app, fresh, harness


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    url = request.getfixturevalue(f"{request.param}_url")
    with harness(url, tmp_path_factory.mktemp(request.param), n=2, pool="solo") as h:
        yield h


def stats(h: Harness) -> dict[str, dict[str, Any]]:
    hosts = [w.hostname for w in h.cluster.workers]
    return {host: s["forseti"] for host, s in (h.app.control.inspect(hosts, timeout=2).stats() or {}).items()}


def leader_of(h: Harness) -> str:
    def found() -> str | None:
        leaders = [host for host, s in stats(h).items() if s["leader"]]
        return leaders[0] if len(leaders) == 1 else None
    return wait_for(found, 10, 0.1, "no single leader")


def live_key(h: Harness, prefix: str, value: int = 3) -> KeyRef:
    """A new key whose process holds ``value`` as its state."""
    ref = h.forseti.get_key(fresh(prefix))
    for _ in range(value):
        ref.send("inc")
    assert ref.call("get") == value
    return ref


def lookup_afresh(h: Harness, key: str) -> KeyRef:
    """``get_key`` from a client that never saw the key (no cache): what the leader's table says."""
    app = client_app(h.cluster.broker_url, h.namespace)
    forseti = Forseti.of(app)
    try:
        return forseti.get_key(key, timeout=5)
    finally:
        forseti.close()


def test_a_forged_exit_report_of_a_live_process_frees_nothing(h: Harness) -> None:
    ref = live_key(h, "forged-exit")
    # Everything a client can know of the process (a KeyRef names its worker and pid).
    forge(h, h.forseti.names.leader, forged_exit(ref))
    assert h.forseti.search_key(ref.key) == ref, "a forged exit report freed a live key"
    assert lookup_afresh(h, ref.key) == ref
    assert len(h.starts(ref.key)) == 1, "a second process started for a live key"
    assert ref.call("get") == 3


def test_a_forged_start_report_naming_a_live_process_kills_nothing(h: Harness) -> None:
    ref = live_key(h, "forged-spawned")
    forge(h, h.forseti.names.leader, forged_start(ref))
    # Handled in order: whatever the leader sent the worker for it is in the worker's queue before
    # the answer to this search, and so before the call below.
    assert h.forseti.search_key(ref.key) == ref
    assert ref.call("get") == 3, "a forged start report stopped the live process"
    assert alive(ref.pid)


def test_a_spawn_order_with_a_huge_epoch_does_not_wedge_placement(h: Harness) -> None:
    leader = leader_of(h)
    for worker in h.cluster.workers:
        forge(h, h.forseti.names.node_routing_key(worker.hostname), forged_spawn(fresh("forged-order"), 10**9))
    refs = [h.forseti.get_key(fresh("after-forged-order"), timeout=5) for _ in range(20)]
    assert {ref.node for ref in refs} == {w.hostname for w in h.cluster.workers}
    assert all(ref.call("key") == ref.key for ref in refs)
    epochs = {host: s["epoch"] for host, s in stats(h).items()}
    print(f"\n[forged] epochs after a spawn order claiming 10**9: {epochs} (leader {leader})")
    assert max(epochs.values()) < 10**9
    for ref in refs:
        ref.stop()


def test_a_heartbeat_naming_a_live_worker_with_a_new_incarnation_frees_none_of_its_keys(h: Harness) -> None:
    leader = leader_of(h)
    (victim,) = [w.hostname for w in h.cluster.workers if w.hostname != leader]
    refs = [live_key(h, "forged-incarnation", 2) for _ in range(4)]
    mine = [ref for ref in refs if ref.node == victim]
    assert mine, "no key was placed on the victim"
    inc = uuid.uuid4().hex
    forge(h, "", forged_heartbeat(victim, inc), broadcast=True)
    log = h.cluster.worker(leader)
    lost = f"worker {victim} lost"
    wait_for(lambda: inc in log.log_text() or lost in log.log_text(), 10, 0.1,
             "the leader never handled the forged heartbeat")
    assert lost not in log.log_text(), "a forged heartbeat freed the keys of a live worker"
    for ref in mine:
        assert lookup_afresh(h, ref.key) == ref
        assert ref.call("get") == 2
        assert len(h.starts(ref.key)) == 1


def test_a_heartbeat_claiming_a_higher_epoch_does_not_depose_the_leader(h: Harness) -> None:
    leader = leader_of(h)
    before = stats(h)
    forger = f"forger-{uuid.uuid4().hex[:6]}@nowhere"
    forge(h, "", forged_heartbeat(forger, leader=True, epoch=10**9), broadcast=True)
    # Heard once every worker lists the forger as a member (the same heartbeat).
    wait_for(lambda: all(forger in s["members"] for s in stats(h).values()), 10, 0.1,
             "the workers never heard the forged heartbeat")
    after = stats(h)
    print(f"\n[forged] epochs before {({k: s['epoch'] for k, s in before.items()})}, "
          f"after {({k: s['epoch'] for k, s in after.items()})}")
    assert after[leader]["leader"], "the real leader stepped down"
    assert after[leader]["epoch"] == before[leader]["epoch"]
    assert all(s["epoch"] < 10**9 for s in after.values()), "a forged epoch was believed"
    assert "stepping down" not in h.cluster.worker(leader).log_text()
    ref = h.forseti.get_key(fresh("after-forged-epoch"), timeout=5)
    assert ref.call("key") == ref.key
    ref.stop()


def test_a_leader_elected_after_redis_lost_its_data_is_obeyed_although_its_token_went_back(tmp_path: Path) -> None:
    # The election is the truth, also when it forgets: every lease went with the data, so no
    # older leader leads either, and the workers take the new, lower token.
    require("redis-server")
    server = PrivateRedis(tmp_path / "redis").start()
    try:
        with harness(server.url, tmp_path, n=2, pool="solo", FORSETI_HEARTBEAT="0.3", FORSETI_NODE_TIMEOUT="12",
                     FORSETI_LEASE="1.5") as h:
            # A change of leader first: every worker holds epoch 2 from then on.
            h.cluster.worker(leader_of(h)).restart()
            wait_for(lambda: sorted(s["epoch"] for s in stats(h).values()) == [2, 2], 20, 0.1,
                     lambda: f"the workers never took the second leader's epoch: {stats(h)}")
            server.kill()
            server.start()  # empty: no counter, no lease

            def one_leader() -> bool:
                try:
                    return sum(s["leader"] for s in stats(h).values()) == 1
                except (OSError, redis.exceptions.ConnectionError, OperationalError):  # still reconnecting
                    return False
            wait_for(one_leader, 30, 0.2, "no leader after the wipe")
            refs = [h.forseti.get_key(fresh("after-wipe"), timeout=10) for _ in range(6)]
            assert {ref.node for ref in refs} == {w.hostname for w in h.cluster.workers}
            assert all(ref.call("key") == ref.key for ref in refs)
            assert sorted(s["epoch"] for s in stats(h).values()) == [1, 1]
    finally:
        server.close()
