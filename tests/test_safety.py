"""What the safety checks promise, pinned one by one: each test here fails if its check is dropped
or weakened (a deposed leader's order obeyed, the fencing margin cut, a duplicate kept, a key one
character too long refused, a late exit report freeing the key of a newer process)."""

from __future__ import annotations

import sys
import threading
import traceback
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from forseti_celery import Forseti, InvalidKey
from forseti_celery.core import protocol as p
from forseti_celery.core.broker import Publisher
from forseti_celery.core.conf import Settings
from forseti_celery.testing import wait_for
from forseti_celery.worker.leader import Leader
from forseti_celery.worker.membership import Members
from forseti_celery.worker.node import Node

from .helpers import Harness, fresh, harness
from .test_leader import Wire, get, report, search, three_live_workers


@pytest.fixture
def cluster() -> tuple[Leader, Members, Wire]:
    """A leader on "a" with three live workers, rebuilt (ready), nothing placed."""
    leader, members, wire = three_live_workers()
    leader.activate(0)
    return leader, members, wire


def stops(wire: Wire) -> list[tuple[str, dict[str, Any]]]:
    return [(h, m) for h, m in wire.to_nodes if m["t"] == p.STOP]


def exited(key: str, node: str, pid: int | None, sid: str | None = None, **extra: Any) -> dict[str, Any]:
    """An exit report: of process ``pid`` (placed as ``sid``), or pid-less (a stop that found none)."""
    return {"t": p.EXITED, "n": "default", "k": key, "node": node, "pid": pid, **({"sid": sid} if sid else {}),
            **extra}


def holder(leader: Leader, wire: Wire, key: str) -> Any:
    corr = uuid.uuid4().hex
    leader.handle(search(key, corr))
    return wire.answer(corr)["v"]


# -- the leader keeps one process per key --------------------------------------------------------


def test_two_workers_reporting_one_key_to_a_new_leader_get_the_second_one_stopped(cluster: Any) -> None:
    leader, _, wire = cluster
    leader.report(report("a", []))
    leader.report(report("b", [["default", "k", 201, "sb"]]))
    leader.report(report("c", [["default", "k", 301, "sc"]]))  # after a split brain: one too many
    assert leader.ready
    assert [(h, m["k"], m["p"], m["reason"]) for h, m in stops(wire)] == [("c", "k", 301, "duplicate")]
    assert holder(leader, wire, "k") == ["b", 201]


def test_a_worker_reporting_a_key_the_leader_holds_elsewhere_gets_its_copy_stopped(cluster: Any) -> None:
    leader, _, wire = cluster
    for host in ("a", "b", "c"):
        leader.report(report(host, [["default", "k", 201, "sb"]] if host == "b" else []))
    assert leader.ready and not stops(wire)
    # Reconciliation (asked after a count mismatch): c runs the key too.
    leader.report(report("c", [["default", "k", 301, "sc"]], q=10))
    assert [(h, m["k"], m["p"], m["reason"]) for h, m in stops(wire)] == [("c", "k", 301, "duplicate")]
    assert holder(leader, wire, "k") == ["b", 201]


def test_a_start_report_for_a_key_live_elsewhere_gets_the_new_process_stopped(cluster: Any) -> None:
    leader, _, wire = cluster
    for host in ("a", "b", "c"):
        leader.report(report(host, [["default", "k", 201, "sb"]] if host == "b" else []))
    # Started on a deposed leader's order, say.
    leader.handle({"t": p.SPAWNED, "n": "default", "k": "k", "node": "c", "pid": 301, "sid": "other"})
    assert [(h, m["k"], m["p"], m["reason"]) for h, m in stops(wire)] == [("c", "k", 301, "duplicate")]
    assert holder(leader, wire, "k") == ["b", 201]


def test_a_late_exit_report_of_an_older_process_on_the_same_worker_frees_nothing(cluster: Any) -> None:
    leader, _, wire = cluster
    for host in ("a", "b", "c"):
        leader.report(report(host, [["default", "k", 100, "s1"]] if host == "b" else []))
    # Process 100 ends; the key is placed again and starts as 200.
    leader.handle(exited("k", "b", 100, sid="s1"))
    leader.handle(get("k", "1"))
    ((host, spawn),) = wire.spawns()
    leader.handle({"t": p.SPAWNED, "n": "default", "k": "k", "node": host, "pid": 200, "sid": spawn["sid"]})
    assert holder(leader, wire, "k") == [host, 200]
    # Exit reports naming the new holder's worker and another pid (late, repeated, or forged): of
    # the older process, and with the new placement's sid.
    leader.handle(exited("k", host, 100, sid="s1"))
    assert holder(leader, wire, "k") == [host, 200]
    leader.handle(exited("k", host, 100, sid=spawn["sid"]))
    assert holder(leader, wire, "k") == [host, 200]
    leader.handle(get("k", "2"))
    assert wire.answer("2")["v"] == [host, 200] and len(wire.spawns()) == 1


def test_an_exit_report_without_a_pid_answers_its_stopper_and_frees_nothing(cluster: Any) -> None:
    leader, _, wire = cluster
    for host in ("a", "b", "c"):
        leader.report(report(host, [["default", "k", 200, "s2"]] if host == "b" else []))
    # What a worker sends for a stop that found no process (children.py _not_there): the process
    # the stopper meant is gone, which says nothing of the one the leader has now.
    leader.handle(exited("k", "b", None, stoppers=[["client", "stop-1"]]))
    assert wire.answer("stop-1")["v"] is True
    assert holder(leader, wire, "k") == ["b", 200]
    leader.handle(get("k", "2"))
    assert wire.answer("2")["v"] == ["b", 200] and not wire.spawns()


# -- fencing comes first -----------------------------------------------------------------------------


def in_process_node(url: str, **conf: Any) -> Node:
    """A worker's Node built in this process (not started): its fencing clock can be driven by hand."""
    app = Celery(f"node-{uuid.uuid4().hex[:6]}", broker=url, set_as_current=False)
    app.conf.update(forseti_namespace=f"forseti-s{uuid.uuid4().hex[:8]}", forseti_spares=0,
                    **{f"forseti_{k}": v for k, v in conf.items()})
    return Node(Forseti(app), f"n-{uuid.uuid4().hex[:6]}@test")


@pytest.mark.parametrize(("heartbeat", "node_timeout"), [(1.0, 8.0), (0.5, 3.0), (0.3, 2.5), (1.0, 3.5)])
def test_a_cut_off_worker_fences_at_least_a_heartbeat_before_the_leader_may_declare_it_dead(
    redis_url: str, heartbeat: float, node_timeout: float
) -> None:
    settings = Settings(heartbeat=heartbeat, node_timeout=node_timeout)
    assert settings.node_timeout - settings.fence_after >= 2 * settings.heartbeat * (1 - 1e-9)
    node = in_process_node(redis_url, heartbeat=heartbeat, node_timeout=node_timeout)
    try:
        # The leader hears the worker's last heartbeat when the worker hears its own echo of it;
        # from then on neither hears anything. The worker checks at its own tick interval.
        members = Members(node_timeout)
        hb = {"node": node.hostname, "inc": node.incarnation, "eligible": True, "names": []}
        heard = members.heard(hb) or members.get(node.hostname)
        assert heard is not None
        node.liveness.last_echo = heard.last_seen
        interval = min(0.25, heartbeat / 2)
        now = heard.last_seen
        while not node.liveness.fenced:
            now += interval
            node.liveness.fence(now)
            assert not members.expire(now), "declared dead before the worker fenced"
        print(f"\n[safety] heartbeat={heartbeat} node_timeout={node_timeout}: fenced "
              f"{heard.last_seen + node_timeout - now:.2f} s before it may be declared dead")
        assert not members.expire(now + heartbeat), "less than a heartbeat between fencing and being declared dead"
    finally:
        node.events.close()
        node.publisher.close()


# -- real workers --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    url = request.getfixturevalue(f"{request.param}_url")
    with harness(url, tmp_path_factory.mktemp(request.param), n=2, pool="solo") as h:
        yield h


def test_a_key_of_exactly_the_longest_accepted_length_is_served_and_one_more_character_is_refused(
    h: Harness,
) -> None:
    longest = h.forseti.settings.max_key_length
    key = fresh("long")
    key += "x" * (longest - len(key))
    assert h.forseti.search_key(key) is None
    ref = h.forseti.get_key(key)
    assert ref.key == key and ref.call("key") == key
    assert h.forseti.search_key(key) == ref
    ref.stop()
    with pytest.raises(InvalidKey):
        h.forseti.get_key(key + "x")
    with pytest.raises(InvalidKey):
        h.forseti.search_key(key + "x")


def test_a_worker_refuses_a_spawn_order_from_a_leader_older_than_one_it_has_heard(h: Harness) -> None:
    hosts = [w.hostname for w in h.cluster.workers]
    stats = h.app.control.inspect(hosts, timeout=2).stats() or {}
    (leader,) = [host for host, s in stats.items() if s["forseti"]["leader"]]
    (worker,) = [host for host in hosts if host != leader]
    # The worker has heard the leader's heartbeats (and its report request): it knows its epoch.
    epoch = wait_for(lambda: (h.app.control.inspect([worker], timeout=2).stats() or {})
                     .get(worker, {}).get("forseti", {}).get("epoch"), 10, 0.1, "no epoch on the worker")
    assert epoch >= 1
    stale, current = fresh("stale-order"), fresh("current-order")

    def order(key: str, epoch: int) -> dict[str, Any]:
        return {"t": p.SPAWN, "n": "default", "k": key, "a": [], "sid": uuid.uuid4().hex, "epoch": epoch,
                "leader": leader, "w": []}

    # What a deposed leader, resumed, sends (one epoch behind); then an order of the current epoch,
    # on the same queue: once that one has started, the stale one has been handled.
    publisher = Publisher(h.app.connection_for_write())
    try:
        rk = h.forseti.names.node_routing_key(worker)
        publisher.publish(h.forseti.names.exchange, rk, [order(stale, epoch - 1)])
        publisher.publish(h.forseti.names.exchange, rk, [order(current, epoch)])
    finally:
        publisher.close()
    # Started on an order it did not give, the leader adopts the process (its start report).
    ref = wait_for(lambda: h.forseti.search_key(current), 10, 0.1, "the current order never started")
    assert ref.node == worker
    assert h.starts(stale) == [], "a deposed leader's order started a process"
    assert h.forseti.search_key(stale) is None, "a deposed leader's order was reported as started"
    assert f"refused spawn of {stale!r}" in h.cluster.worker(worker).log_text()
    ref.stop()


# -- a leader that hands over ----------------------------------------------------------------------------


def test_a_stopping_leader_acts_on_no_leader_message_once_its_role_can_pass(broker_url: str) -> None:
    # One worker's Node, in this process on the real broker, leads; clients keep asking it while it
    # stops. Watched from inside: what its leader sends, and the moment its lease is released.
    node = in_process_node(broker_url, heartbeat=0.3, node_timeout=2.5, lease=1.5)
    names = node.names
    released = threading.Event()
    at_release: list[tuple[bool, str]] = []
    acted: dict[bool, int] = {False: 0, True: 0}  # replies and orders, before/after the release
    leader = node.leader
    reply, send_node, release = leader._reply, leader._send_node, node.election.release

    def watched_reply(rk: str, msg: dict[str, Any]) -> None:
        acted[released.is_set()] += 1
        reply(rk, msg)

    def watched_send_node(host: str, msg: dict[str, Any]) -> None:
        acted[released.is_set()] += 1
        send_node(host, msg)

    def watched_release() -> None:
        at_release.append((leader.active, threading.current_thread().name))
        released.set()  # before it happens: a successor may lead from the next instant
        release()

    leader._reply, leader._send_node = watched_reply, watched_send_node  # type: ignore[method-assign]
    node.election.release = watched_release  # type: ignore[method-assign]
    asking = threading.Event()
    asking.set()

    def ask() -> None:
        # A name nobody knows: the leader answers each request at once (unknown_name).
        publisher = Publisher(node.forseti.app.connection_for_write())
        try:
            while asking.is_set():
                msgs = [{"t": p.GET, "n": "nobody", "k": fresh("k"), "a": [], "r": "nowhere",
                         "c": uuid.uuid4().hex} for _ in range(20)]
                for msg in msgs:
                    publisher.publish(names.exchange, names.leader, [msg], declare=[names.leader_queue])
        finally:
            publisher.close()

    asker = threading.Thread(target=ask, daemon=True)
    node.start()
    try:
        wait_for(lambda: leader.ready, 15, 0.05, "the node never led")
        asker.start()
        wait_for(lambda: acted[False] >= 50, 15, 0.01, "the leader never answered")
        node.stop(grace=1.0)
    finally:
        asking.clear()
        asker.join(10)
        with node.forseti.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(names.leader)
    print(f"\n[safety] acted before the release: {acted[False]}, after: {acted[True]}; released: {at_release}")
    assert acted[True] == 0, f"acted on {acted[True]} leader messages after its role could pass"
    # Also when no message came in that window: the role was left before the lease was released.
    assert at_release, "the lease was never released"
    assert not at_release[0][0], "the lease was released while this worker still led"


def test_a_worker_heard_again_after_a_stall_is_eligible_at_once_not_a_heartbeat_later(redis_url: str) -> None:
    """The beats a worker sends while in doubt (after a stall) call it ineligible; the moment its echo
    proves it is heard, its record must say it takes keys again, or a leader (this worker itself,
    replaying the held requests) answers a new key "no eligible live worker" for up to a heartbeat
    (seen after a broker restart in test_broker_restart_keeps_the_children_...[rabbitmq])."""
    node = in_process_node(redis_url)
    try:
        node.liveness.stalled(node.liveness.last_run + 10 * node.liveness.stall_after)  # a stall: in doubt from now on
        assert node.liveness.doubt is not None
        node._beat()  # what it says while in doubt
        sent = {"t": p.HEARTBEAT, "node": node.hostname, "inc": node.incarnation, "seq": node.liveness.beats,
                "eligible": False, "names": ["default"], "count": 0, "leader": False, "epoch": 0}
        me = node.members.get(node.hostname)
        assert me is not None and not me.eligible
        node._heard(sent)  # its echo comes back: heard again
        assert node.liveness.doubt is None
        me = node.members.get(node.hostname)
        assert me is not None and me.eligible, "still ineligible until its next heartbeat"
    finally:
        node.events.close()
        node.publisher.close()


def test_an_order_a_leader_gives_its_own_worker_is_handled_after_the_leader_returns_never_inside_it(
    redis_url: str,
) -> None:
    """What a leader sends its own worker (its report request, the report, a spawn order) waits in
    the node's local queue and is handled after the message that sent it, in order: the node's
    dispatch never runs inside the leader (registry -> leader -> registry -> ... as it did)."""
    node = in_process_node(redis_url)
    leader_file = sys.modules[Leader.__module__].__file__
    seen: list[tuple[str, Any, bool]] = []  # (what, its args, handled inside the leader?)

    def in_leader() -> bool:
        return any(frame.filename == leader_file for frame in traceback.extract_stack())

    registry_report = node.children.registry_report

    def reported() -> Any:
        seen.append(("report", None, in_leader()))
        return registry_report()

    def spawn(name: str, key: str, args: list[Any], sid: str, waiters: Any = None, *held: Any) -> None:
        seen.append((key, args, in_leader()))

    node.children.registry_report = reported  # type: ignore[method-assign]
    node.children.spawn = spawn  # type: ignore[method-assign]
    try:
        node.members.heard({"node": node.hostname, "inc": node.incarnation, "eligible": True,
                            "names": ["default"], "count": 0})
        assert node.election.poll(), "no lease on a namespace of its own"
        node.role.lease(True, False)  # takes the role: asks every member for its registry, itself too
        assert node.leader.active and not node.leader.ready and not seen, "asked itself inside activate()"
        node._settle()  # what the tick does next
        assert node.leader.ready and seen == [("report", None, False)]
        one, two = fresh("one"), fresh("two")
        node._handle([{"t": p.GET, "n": "default", "k": one, "a": [1], "r": "client", "c": "c1"},
                      {"t": p.GET, "n": "default", "k": two, "a": [2], "r": "client", "c": "c2"}])
        # Each spawn after the get that ordered it, before the next get; none inside the leader.
        assert seen[1:] == [(one, [1], False), (two, [2], False)]
        assert node.names.node_routing_key(node.hostname) not in node.sender._out, "sent itself through the broker"
    finally:
        node.election.release()
        node.events.close()
        node.sender.close()
        node.election.close()
