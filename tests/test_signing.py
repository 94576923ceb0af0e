"""The worker secret, against a real cluster on both brokers: workers started with
``forseti_worker_secret`` act on no worker message (heartbeat, goodbye, report, order) that is
not signed with it, refuse a signed message replayed, redirected or too old, still serve clients
that have no secret, and rotate the secret with a rolling restart.

Each forged message is one a worker would act on without the secret: it names the real epoch,
leader, incarnation or sid (learned as an attacker with broker access learns them: a heartbeat
heard on the fanout, a report asked for), and is published once unsigned and once signed with a
wrong secret, where the forger would put it."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Consumer, Exchange, Producer

from forseti_celery import KeyRef
from forseti_celery.core import protocol as p
from forseti_celery.core import signing
from forseti_celery.core.signing import Signer
from forseti_celery.testing import wait_for

from .chaos_support import forged_bye, forged_heartbeat
from .helpers import Harness, alive, fresh, harness
from .test_forged import leader_of, live_key, lookup_afresh, stats

SECRET = "the-workers-secret-of-the-tests"
WRONG = "a-secret-the-workers-do-not-hold"
#: How a forger signs: not at all, or with a secret of its own.
FORGERIES = [(None, "unsigned"), (WRONG, "bad")]


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    url = request.getfixturevalue(f"{request.param}_url")
    with harness(url, tmp_path_factory.mktemp(request.param), n=2, pool="solo", FORSETI_WORKER_SECRET=SECRET) as h:
        yield h


def publish(h: Harness, exchange: Exchange, routing_key: str, body: bytes, headers: dict[str, str]) -> None:
    """Put ``body`` with ``headers`` on the broker as it is (a forger's or a replayer's bytes)."""
    names = h.forseti.names
    with h.app.connection_for_write() as conn:
        Producer(conn.channel()).publish(
            body, exchange=exchange, routing_key=routing_key, headers=headers,
            content_type=p.CONTENT_TYPE, content_encoding=p.CONTENT_ENCODING,
            declare=[names.leader_queue] if routing_key == names.leader else [exchange])


def forge(h: Harness, routing_key: str | None, msg: dict[str, Any], secret: str | None) -> tuple[bytes, dict[str, str]]:
    """Publish ``msg`` to a queue of the namespace (``None``: the heartbeat fanout), signed with
    ``secret`` if any; the body and headers sent."""
    names = h.forseti.names
    exchange, rk = (names.bcast_exchange, "") if routing_key is None else (names.exchange, routing_key)
    body = p.encode([msg])
    headers = {} if secret is None else Signer([secret], "forger@nowhere", 4.0).headers(exchange.name, rk, body)
    publish(h, exchange, rk, body, headers)
    return body, headers


def dropped(h: Harness) -> dict[str, dict[str, int]]:
    """Worker messages each worker dropped so far, per reason."""
    return {host: s["dropped"] for host, s in stats(h).items()}


def dropped_by(h: Harness, hosts: list[str], reason: str, send: Callable[..., Any], *args: Any) -> None:
    """``send(*args)`` and wait until each of ``hosts`` dropped more messages for ``reason``."""
    before = dropped(h)
    send(*args)
    wait_for(lambda: all(d.get(reason, 0) > before[host].get(reason, 0) for host, d in dropped(h).items()
                         if host in hosts), 10, 0.1,
             lambda: f"{hosts} never dropped a {reason} message: {dropped(h)}\n{h.cluster.log_tails()}")


def other_than(h: Harness, host: str) -> str:
    return next(w.hostname for w in h.cluster.workers if w.hostname != host)


def on(h: Harness, host: str, prefix: str) -> KeyRef:
    """A live key whose process runs on ``host``: new keys go to the least used worker, so the keys
    placed elsewhere meanwhile stay (stopped, the next would go there again)."""
    def placed() -> KeyRef | None:
        ref = live_key(h, prefix)
        return ref if ref.node == host else None
    return wait_for(placed, 20, 0.05, f"no key placed on {host}")


def spy(h: Harness, host: str, msg: dict[str, Any], secret: str | None) -> list[dict[str, Any]]:
    """Send ``msg`` (a report request) to ``host`` asking for the answer on a queue of ours; what came
    back once a call to a key on ``host``, queued behind it, was answered."""
    names = h.forseti.names
    me = f"spy-{uuid.uuid4().hex[:6]}@nowhere"
    with h.app.connection_for_write() as conn:
        queue = names.node_queue(me)(conn.channel())
        queue.declare()
        forge(h, names.node_routing_key(host), {**msg, "leader": me}, secret)
        on(h, host, "spy-barrier")  # a call handled after msg: its answer is on the wire before
        answers = []
        while (m := queue.get(no_ack=True)) is not None:
            answers.extend(p.decode(m.body))
        queue.delete()
        return answers


def registry_of(h: Harness, host: str) -> list[list[Any]]:
    """``host``'s ``[name, key, pid, sid]`` rows, asked for as the leader asks (signed)."""
    epoch = stats(h)[host]["epoch"]
    answers = spy(h, host, {"t": p.REPORT_REQUEST, "epoch": epoch, "q": 0}, SECRET)
    return [row for a in answers if a["t"] == p.REPORT for row in a["procs"]]


def captured_heartbeat(h: Harness, host: str) -> tuple[dict[str, Any], bytes, dict[str, str]]:
    """The next heartbeat of ``host`` as it crossed the broker (heard on a fanout queue of our own)."""
    heard: list[tuple[dict[str, Any], bytes, dict[str, str]]] = []

    def on_message(m: Any) -> None:
        body = m.body if isinstance(m.body, bytes) else m.body.encode()
        heard.extend((x, body, dict(m.headers)) for x in p.decode(body)
                     if x["t"] == p.HEARTBEAT and x["node"] == host)

    with h.app.connection_for_read() as conn, \
            Consumer(conn.channel(), [h.forseti.names.bcast_queue("spy@nowhere", uuid.uuid4().hex)], no_ack=True,
                     on_message=on_message):
        def drained() -> bool:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.1)
            return bool(heard)
        wait_for(drained, 10, 0.0, f"never heard a heartbeat of {host}")
    return heard[0]


def test_a_spawn_order_without_the_worker_secret_starts_no_process(h: Harness) -> None:
    leader = leader_of(h)
    for secret, reason in FORGERIES:
        for worker in h.cluster.workers:
            key = fresh("forged-order")
            order = {"t": p.SPAWN, "n": "default", "k": key, "a": [], "sid": uuid.uuid4().hex,
                     "epoch": stats(h)[worker.hostname]["epoch"], "leader": leader, "w": []}
            dropped_by(h, [worker.hostname], reason,
                       forge, h, h.forseti.names.node_routing_key(worker.hostname), order, secret)
            assert h.starts(key) == [], f"a forged spawn order ({reason}) started a process"
    assert "without a signature" in h.cluster.worker(leader).log_text()


def test_an_exit_report_without_the_worker_secret_frees_nothing_even_with_the_real_sid(h: Harness) -> None:
    ref = live_key(h, "forged-exit")
    (sid,) = [sid for name, key, pid, sid in registry_of(h, ref.node) if key == ref.key]
    exited = {"t": p.EXITED, "n": ref.name, "k": ref.key, "node": ref.node, "pid": ref.pid, "sid": sid,
              "reason": "normal"}
    for secret, reason in FORGERIES:
        dropped_by(h, [leader_of(h)], reason, forge, h, h.forseti.names.leader, exited, secret)
        assert h.forseti.search_key(ref.key) == ref, f"a forged exit report ({reason}) freed a live key"
    assert lookup_afresh(h, ref.key) == ref
    assert len(h.starts(ref.key)) == 1, "a second process started for a live key"
    assert ref.call("get") == 3


def test_a_start_report_without_the_worker_secret_kills_nothing(h: Harness) -> None:
    ref = live_key(h, "forged-spawned")
    (sid,) = [sid for name, key, pid, sid in registry_of(h, ref.node) if key == ref.key]
    for secret, reason in FORGERIES:
        spawned = {"t": p.SPAWNED, "n": ref.name, "k": ref.key, "node": other_than(h, ref.node),
                   "pid": ref.pid + 1, "sid": sid}
        dropped_by(h, [leader_of(h)], reason, forge, h, h.forseti.names.leader, spawned, secret)
        assert h.forseti.search_key(ref.key) == ref
    assert ref.call("get") == 3, "a forged start report stopped the live process"
    assert alive(ref.pid)


def test_a_report_request_without_the_worker_secret_reveals_nothing(h: Harness) -> None:
    host = h.cluster.workers[0].hostname
    live_key(h, "forged-report-request")
    for secret, reason in FORGERIES:
        epoch = stats(h)[host]["epoch"]
        before = dropped(h)[host].get(reason, 0)
        answers = spy(h, host, {"t": p.REPORT_REQUEST, "epoch": epoch, "q": 0}, secret)
        assert dropped(h)[host].get(reason, 0) > before
        assert answers == [], f"a forged report request ({reason}) was answered with the worker's sids"


def test_a_report_without_the_worker_secret_frees_none_of_a_workers_keys(h: Harness) -> None:
    leader = leader_of(h)
    victim = other_than(h, leader)
    refs = [on(h, victim, "forged-report") for _ in range(2)]
    for secret, reason in FORGERIES:
        # As if the victim had answered a question asked after every key of it: it holds none.
        report = {"t": p.REPORT, "node": victim, "epoch": stats(h)[victim]["epoch"], "procs": [], "q": 10**12}
        dropped_by(h, [leader], reason, forge, h, h.forseti.names.node_routing_key(leader), report, secret)
        assert [h.forseti.search_key(ref.key) for ref in refs] == refs, f"a forged report ({reason}) freed keys"
    assert [lookup_afresh(h, ref.key) for ref in refs] == refs
    assert [ref.call("get") for ref in refs] == [3, 3]


def test_a_heartbeat_without_the_worker_secret_adds_no_member(h: Harness) -> None:
    hosts = [w.hostname for w in h.cluster.workers]
    for secret, reason in FORGERIES:
        forger = f"forger-{uuid.uuid4().hex[:6]}@nowhere"
        dropped_by(h, hosts, reason, forge, h, None, forged_heartbeat(forger), secret)
        assert all(forger not in s["members"] for s in stats(h).values()), "a forged heartbeat added a member"
        assert forger not in h.forseti.get_metrics()
        refs = [h.forseti.get_key(fresh("after-forged-member"), timeout=5) for _ in range(4)]
        assert {ref.node for ref in refs} <= set(hosts)


def test_a_heartbeat_without_the_worker_secret_naming_a_live_worker_is_not_even_considered(h: Harness) -> None:
    hosts = [w.hostname for w in h.cluster.workers]
    victim = hosts[-1]
    for secret, reason in FORGERIES:
        inc = uuid.uuid4().hex
        dropped_by(h, hosts, reason, forge, h, None, forged_heartbeat(victim, inc), secret)
        # Without the secret it would wait as the victim's successor ("not believed while ... beats").
        assert all(inc not in w.log_text() for w in h.cluster.workers)
        real, _, _ = captured_heartbeat(h, victim)
        # Its own incarnation: what every member believes of it (its names, its eligibility).
        dropped_by(h, hosts, reason, forge, h, None, {**real, "seq": real["seq"] + 1, "eligible": False,
                                                              "names": []}, secret)
    assert victim in h.forseti.get_metrics()


def test_a_goodbye_without_the_worker_secret_frees_none_of_a_live_workers_keys(h: Harness) -> None:
    leader = leader_of(h)
    victim = other_than(h, leader)
    refs = [on(h, victim, "forged-bye") for _ in range(2)]
    real, _, _ = captured_heartbeat(h, victim)  # its incarnation, as anyone on the fanout hears it
    for secret, reason in FORGERIES:
        dropped_by(h, [leader], reason, forge, h, None, forged_bye(victim, real["inc"]), secret)
        assert [h.forseti.search_key(ref.key) for ref in refs] == refs, f"a forged goodbye ({reason}) freed keys"
    assert victim in stats(h)[leader]["members"]
    assert [ref.call("get") for ref in refs] == [3, 3]


def test_a_lost_note_from_the_wire_frees_nothing(h: Harness) -> None:
    # "lost" is the registry's own note of a dead worker, held while its role is in doubt: no
    # message may say it, signed or not (a leader took it from any queue and freed every key).
    leader = leader_of(h)
    victim = other_than(h, leader)
    refs = [on(h, victim, "forged-lost") for _ in range(2)]
    forge(h, h.forseti.names.leader, {"t": "lost", "node": victim}, None)
    forge(h, h.forseti.names.node_routing_key(leader), {"t": "lost", "node": victim}, None)
    on(h, leader, "lost-barrier")  # handled after both, by the leader
    assert [h.forseti.search_key(ref.key) for ref in refs] == refs, "a forged 'lost' freed a worker's keys"


def test_a_replayed_signed_heartbeat_is_refused(h: Harness) -> None:
    hosts = [w.hostname for w in h.cluster.workers]
    names = h.forseti.names
    _, body, headers = captured_heartbeat(h, hosts[0])
    assert signing.HEADER in headers, "workers with a secret sign their heartbeats"
    before = dropped(h)
    publish(h, names.bcast_exchange, "", body, headers)  # the very bytes: every worker has seen its nonce
    wait_for(lambda: all(d.get("replayed", 0) + d.get("stale", 0) > before[host].get("replayed", 0)
                         + before[host].get("stale", 0) for host, d in dropped(h).items()), 10, 0.1,
             lambda: f"a replayed heartbeat was not refused: {dropped(h)}")
    print(f"\n[signing] replayed heartbeat refused as: {dropped(h)}")


def test_a_replayed_redirected_or_stale_signed_spawn_order_is_refused(h: Harness,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Signed with the real secret, as the leader would: what a replayer captured off the wire.
    leader = leader_of(h)
    target, other = h.cluster.workers[0].hostname, h.cluster.workers[1].hostname
    names = h.forseti.names
    key = fresh("replayed-order")
    order = {"t": p.SPAWN, "n": "default", "k": key, "a": [], "sid": uuid.uuid4().hex,
             "epoch": stats(h)[target]["epoch"], "leader": leader, "w": []}
    body, headers = forge(h, names.node_routing_key(target), order, SECRET)
    wait_for(lambda: h.starts(key), 10, 0.05, "the signed order started nothing")
    dropped_by(h, [target], "replayed", publish, h, names.exchange, names.node_routing_key(target), body, headers)
    dropped_by(h, [other], "bad", publish, h, names.exchange, names.node_routing_key(other), body, headers)
    assert len(h.starts(key)) == 1, "a replayed or redirected spawn order started a process"
    # Signed a minute ago (past the window of forseti_node_timeout = 4 s), never seen.
    stale_key = fresh("stale-order")
    past = signing.time.time() - 60
    monkeypatch.setattr(signing, "time", type("Clock", (), {"time": staticmethod(lambda: past)}))
    dropped_by(h, [target], "stale", forge, h, names.node_routing_key(target), {**order, "k": stale_key},
                                                   SECRET)
    assert h.starts(stale_key) == []


def test_a_client_without_the_secret_gets_searches_calls_sends_and_stops(h: Harness) -> None:
    assert not h.app.conf.get("forseti_worker_secret")
    ref = h.forseti.get_key(fresh("client"), timeout=5)
    for _ in range(3):
        ref.send("inc")
    assert ref.call("get") == 3
    assert h.forseti.search_key(ref.key) == ref
    assert set(h.forseti.get_metrics()) == {w.hostname for w in h.cluster.workers}
    ref.stop()
    assert h.forseti.search_key(ref.key) is None
    assert h.forseti.get_key(ref.key, timeout=5).call("get") == 0


def test_a_worker_with_a_wrong_secret_is_not_admitted_and_says_why(h: Harness) -> None:
    hosts = [w.hostname for w in h.cluster.workers]
    env = h.cluster.env
    h.cluster.env = {**env, "FORSETI_WORKER_SECRET": WRONG}
    try:
        stranger = h.cluster.add_worker()
    finally:
        h.cluster.env = env
    try:
        wait_for(lambda: all(d.get("bad", 0) > 0 for host, d in dropped(h).items() if host in hosts), 10, 0.1,
                 lambda: f"the members never dropped the stranger's heartbeats: {dropped(h)}")
        wait_for(lambda: "is none of this worker's" in stranger.log_text(), 10, 0.1,
                 lambda: f"the stranger never said why:\n{stranger.log_tail()}")
        assert all(stranger.hostname not in stats(h)[host]["members"] for host in hosts)
        assert stranger.hostname not in h.forseti.get_metrics()
        refs = [h.forseti.get_key(fresh("not-on-the-stranger"), timeout=5) for _ in range(6)]
        assert {ref.node for ref in refs} == set(hosts)
        print(f"\n[signing] the stranger says: "
              f"{[line for line in stranger.log_text().splitlines() if 'none of this worker' in line][:1]}")
    finally:
        stranger.stop()
        h.cluster.workers.remove(stranger)


def test_a_rolling_restart_rotates_the_worker_secret(broker_url: str, tmp_path: Path) -> None:
    # [old] everywhere -> [old, new] (old signs, both verify) -> [new, old] -> [new]: at every step
    # a restarted worker is admitted by the others (it gets new keys) while the rest still run the
    # previous step's secrets.
    with harness(broker_url, tmp_path, n=2, pool="solo", FORSETI_WORKER_SECRET="old") as h:
        for secrets in ("old,new", "new,old", "new"):
            for worker in h.cluster.workers:
                worker.env["FORSETI_WORKER_SECRET"] = secrets
                worker.restart()
                h.wait_members(2)
                on(h, worker.hostname, f"rotated-{secrets.replace(',', '-')}")
        print(f"\n[signing] dropped during the rotation: {dropped(h)}")
