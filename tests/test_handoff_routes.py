"""Key-addressed messages follow a key that a warm shutdown handed off (issue 13: "callers see a
pause, not an error"), whether the client caches refs (``forseti_cache``) or not, both brokers.

A client sends and calls key-addressed to ``tally`` keys of a worker, then that worker shuts down
warm (its processes hand off to the others): a *busy* key is streamed to during the shutdown (its
route moves on the old worker's ``moved`` notice), a *quiet* key only before it and after the
worker has gone (its route still points at the old process: the client must learn the worker left,
``forseti-node-lost``, and resolve the key again). Every call is answered, nothing raises
(no ``ProcessGone`` after the call's timeout), and each key handled every message once, in order.

One cluster per broker (3 workers of ``tests.state_app``); each test shuts one down and starts one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from forseti_celery import Forseti
from tests.chaos_support import chaos, wait_one_leader
from tests.handoff_support import APP, message
from tests.helpers import Harness, client_app, fresh

CALL_TIMEOUT = 20.0  # a handoff's pause, under load; the bug waited all of it, then raised ProcessGone


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    url = request.getfixturevalue(f"{request.param}_url")
    tmp: Path = tmp_path_factory.mktemp(request.param)
    with chaos(url, tmp, n=3, pool="prefork", app=APP, FORSETI_HANDOFF_TIMEOUT="8") as (h, monitor):
        yield h
        assert monitor.violations() == []


@pytest.fixture
def h(cluster: Harness) -> Harness:
    while len(cluster.cluster.alive) < 3:
        cluster.cluster.add_worker()
    cluster.wait_members(3)
    return cluster


def client(h: Harness, cache: bool) -> Forseti:
    app = client_app(h.cluster.broker_url, h.namespace)
    app.conf.forseti_cache = cache
    return Forseti.of(app)


@pytest.mark.parametrize("cache", [False, True], ids=["cache-off", "cache-on"])
def test_key_addressed_messages_follow_keys_handed_off_by_a_warm_shutdown(h: Harness, cache: bool) -> None:
    hosts = [w.hostname for w in h.cluster.alive]
    leader = wait_one_leader(h, hosts)
    f = client(h, cache)
    try:
        sent: dict[str, int] = {}

        def tell(key: str, call: bool) -> None:
            sent[key] = sent.get(key, 0) + 1
            if call:
                assert f.call(key, message("c", sent[key]), name="tally", timeout=CALL_TIMEOUT) == sent[key]
            else:
                f.send(key, message("c", sent[key]), name="tally", timeout=CALL_TIMEOUT)

        # Two keys on a worker that is not the leader (it leaves sooner), each with a route: one
        # call and one send so far.
        on: dict[str, list[str]] = {}
        for _ in range(30):
            key = fresh("route")
            tell(key, True)
            tell(key, False)
            node = h.forseti.get_key(key, name="tally", timeout=10).node
            on.setdefault(node, []).append(key)
            if node != leader and len(on[node]) == 2:
                break
        else:
            raise AssertionError(f"no two keys placed on a worker other than {leader}: {on}")
        keys = on[node]
        busy = keys[0]  # the other is quiet: sent nothing while its worker left
        w = next(w for w in h.cluster.alive if w.hostname == node)

        stopped = threading.Event()
        codes: list[int | None] = []

        def shut_down() -> None:
            codes.append(w.stop(60))
            stopped.set()

        stopper = threading.Thread(target=shut_down, daemon=True)
        stopper.start()
        i = 0
        while not stopped.is_set():  # the busy key, streamed to during the handoff
            tell(busy, i % 2 == 0)
            i += 1
        stopper.join()
        assert codes == [0], f"{node} did not leave by itself\n{w.log_tail()}"
        for _ in range(3):  # every key, after its worker has gone: calls and sends in turn
            for key in keys:
                tell(key, False)
                tell(key, True)
        for key in keys:
            state = f.call(key, "state", name="tally", timeout=CALL_TIMEOUT)
            assert (state["count"], state["dups"], state["gaps"]) == (sent[key], 0, 0), (key, state)
            assert state["restored"], f"{key} did not move with its state: {state}"
    finally:
        f.close()
