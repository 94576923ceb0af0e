"""The leader's table logic on its own (no broker): rebuild, early answers, reconciliation."""

from __future__ import annotations

import time
from typing import Any

import pytest

from forseti_celery.core import protocol as p
from forseti_celery.worker.leader import Leader
from forseti_celery.worker.membership import Members


class Wire:
    """What a leader sends: to workers, and as replies."""

    def __init__(self) -> None:
        self.to_nodes: list[tuple[str, dict[str, Any]]] = []
        self.replies: list[tuple[str, dict[str, Any]]] = []

    def node(self, host: str, msg: dict[str, Any]) -> None:
        self.to_nodes.append((host, msg))

    def reply(self, rk: str, msg: dict[str, Any]) -> None:
        self.replies.append((rk, msg))

    def spawns(self) -> list[tuple[str, dict[str, Any]]]:
        return [(h, m) for h, m in self.to_nodes if m["t"] == p.SPAWN]

    def answer(self, corr: str) -> Any:
        found = [m for _, m in self.replies if m["c"] == corr]
        assert len(found) <= 1, found
        return found[0] if found else None


def beat(members: Members, host: str, count: int = 0) -> dict[str, Any]:
    hb = {"t": p.HEARTBEAT, "node": host, "inc": f"inc-{host}", "eligible": True, "names": ["default"],
          "count": count}
    members.heard(hb)
    return hb


def get(key: str, corr: str) -> dict[str, Any]:
    return {"t": p.GET, "n": "default", "k": key, "a": [], "r": "client", "c": corr}


def search(key: str, corr: str) -> dict[str, Any]:
    return {"t": p.SEARCH, "n": "default", "k": key, "r": "client", "c": corr}


def place_one(leader: Leader, wire: Wire) -> tuple[str, dict[str, Any]]:
    """Rebuild from three empty workers, then ``get`` the key "k" (caller "1"): where it went."""
    leader.activate(0)
    for host in ("a", "b", "c"):
        leader.report(report(host, []))
    leader.handle(get("k", "1"))
    ((host, spawn),) = wire.spawns()
    return host, spawn


def report(host: str, procs: list[list[Any]], q: int = 0, **extra: Any) -> dict[str, Any]:
    return {"t": p.REPORT, "node": host, "epoch": 1, "procs": procs, "q": q, **extra}


def three_live_workers() -> tuple[Leader, Members, Wire]:
    """A leader on "a" (not yet activated) that knows three live workers "a", "b" and "c"."""
    members = Members(node_timeout=8.0)
    for host in ("a", "b", "c"):
        beat(members, host)
    wire = Wire()
    return Leader("a", members, wire.node, wire.reply), members, wire


@pytest.fixture
def cluster() -> tuple[Leader, Members, Wire]:
    return three_live_workers()


def test_a_rebuilding_leader_answers_only_what_the_awaited_reports_cannot_change(cluster: Any) -> None:
    leader, _, wire = cluster
    leader.activate(0)
    assert sorted(h for h, m in wire.to_nodes if m["t"] == p.REPORT_REQUEST) == ["a", "b", "c"]
    leader.report(report("a", []))
    # An exit report that came before its worker's registry (which still lists the process).
    leader.handle({"t": p.EXITED, "n": "default", "k": "gone-on-c", "node": "c", "pid": 333, "sid": "s3"})
    leader.report(report("c", [["default", "on-c", 332, "s1"], ["default", "gone-on-c", 333, "s3"],
                               ["default", "exited-on-c", 334, "s2"]]))
    leader.handle(get("on-c", "1"))
    leader.handle(search("on-c", "2"))
    leader.handle(get("new", "3"))
    leader.handle(get("gone-on-c", "4"))
    leader.handle({"t": p.EXITED, "n": "default", "k": "exited-on-c", "node": "c", "pid": 334, "sid": "s2"})
    assert not leader.ready  # b has not reported
    assert wire.answer("1")["v"] == ["c", 332] and wire.answer("2")["v"] == ["c", 332]
    assert wire.answer("3") is None and wire.answer("4") is None and not wire.spawns()
    leader.report(report("b", []))
    assert leader.ready
    # In order: the early exit report frees gone-on-c, so both keys are placed anew (with their callers).
    placed = {m["k"]: m["w"] for _, m in wire.spawns()}
    assert placed == {"new": [["client", "3"]], "gone-on-c": [["client", "4"]]}
    leader.handle(get("exited-on-c", "5"))
    assert "exited-on-c" in {m["k"] for _, m in wire.spawns()}


def test_reconciliation_judges_only_what_was_recorded_before_the_question(cluster: Any) -> None:
    leader, _, wire = cluster
    host, _ = place_one(leader, wire)
    # A registry asked for before the placement cannot know it: the key stays starting.
    leader.report(report(host, [], q=0))
    assert len(wire.spawns()) == 1
    # Asked after it, and the key is not there: its order was lost; placed again.
    leader.report(report(host, [], q=10))
    assert len(wire.spawns()) == 2 and wire.spawns()[1][1]["w"] == [["client", "1"]]
    host2, spawn2 = wire.spawns()[1]
    # Reported with a pid although its start report never came: recorded, and its caller answered.
    leader.report(report(host2, [["default", "k", 77, spawn2["sid"]]], q=10))
    assert wire.answer("1")["v"] == [host2, 77]
    leader.handle(search("k", "2"))
    assert wire.answer("2")["v"] == [host2, 77]


def test_a_start_refused_as_unavailable_goes_to_another_worker(cluster: Any) -> None:
    leader, members, wire = cluster
    first, spawn = place_one(leader, wire)
    leader.handle({"t": p.SPAWN_FAILED, "n": "default", "k": "k", "node": first, "sid": spawn["sid"],
                   "error": "unavailable"})
    assert wire.answer("1") is None  # not an error of the key
    (second, again) = wire.spawns()[1]
    assert second != first and again["w"] == [["client", "1"]]
    # Eligible again on its next heartbeat.
    beat(members, first)
    assert members.get(first).eligible


# -- what a forged or confused message cannot do ----------------------------------------------------


def test_a_heartbeat_naming_a_live_member_with_another_incarnation_is_believed_only_once_it_timed_out() -> None:
    members = Members(node_timeout=8.0)
    beat(members, "a")
    first = members.get("a")
    assert first is not None
    twin = {"t": p.HEARTBEAT, "node": "a", "inc": "other", "eligible": False, "names": [], "count": 0}
    assert members.heard(twin) is None
    assert members.get("a") is first and first.eligible  # the live one's timeout runs on
    assert members.remove("a", "other") is None and "a" in members  # nor does its goodbye count
    # The live one falls silent: its successor, still beating, takes the hostname at once.
    first.last_seen -= 5
    assert [m.hostname for m in members.expire(first.last_seen + 9)] == ["a"]
    successor = members.get("a")
    assert successor is not None and successor.incarnation == "other"


def test_an_exit_report_naming_a_live_process_but_not_its_sid_frees_nothing(cluster: Any) -> None:
    leader, _, wire = cluster
    host, spawn = place_one(leader, wire)
    leader.handle({"t": p.SPAWNED, "n": "default", "k": "k", "node": host, "pid": 7, "sid": spawn["sid"]})
    leader.handle({"t": p.EXITED, "n": "default", "k": "k", "node": host, "pid": 7, "sid": "forged"})
    leader.handle(search("k", "2"))
    assert wire.answer("2")["v"] == [host, 7]
    leader.handle({"t": p.EXITED, "n": "default", "k": "k", "node": host, "pid": 7, "sid": spawn["sid"]})
    leader.handle(search("k", "3"))
    assert wire.answer("3")["v"] is None


def test_a_start_report_naming_the_live_process_with_another_sid_stops_nothing(cluster: Any) -> None:
    leader, _, wire = cluster
    host, spawn = place_one(leader, wire)
    leader.handle({"t": p.SPAWNED, "n": "default", "k": "k", "node": host, "pid": 7, "sid": spawn["sid"]})
    leader.handle({"t": p.SPAWNED, "n": "default", "k": "k", "node": host, "pid": 7, "sid": "forged"})
    # Nor does the right sid from another worker record anything.
    other = next(h for h in ("a", "b", "c") if h != host)
    leader.handle({"t": p.SPAWNED, "n": "default", "k": "k", "node": other, "pid": 7, "sid": spawn["sid"]})
    assert not [m for _, m in wire.to_nodes if m["t"] == p.STOP and m["p"] == 7 and _ == host]
    leader.handle(search("k", "2"))
    assert wire.answer("2")["v"] == [host, 7]


def test_a_start_report_of_a_key_the_leader_never_placed_is_asked_about_not_adopted(cluster: Any) -> None:
    leader, _, wire = cluster
    place_one(leader, wire)
    asked = len([m for _, m in wire.to_nodes if m["t"] == p.REPORT_REQUEST])
    leader.handle({"t": p.SPAWNED, "n": "default", "k": "never", "node": "b", "pid": 9, "sid": "s9"})
    leader.handle(search("never", "2"))
    assert wire.answer("2")["v"] is None
    assert [h for h, m in wire.to_nodes if m["t"] == p.REPORT_REQUEST][asked:] == ["b"]
    # The worker's registry records it, if it runs there.
    leader.report(report("b", [["default", "never", 9, "s9"]], q=10))
    leader.handle(search("never", "3"))
    assert wire.answer("3")["v"] == ["b", 9]


def test_a_leader_holding_a_fencing_token_leads_with_it_whatever_the_reports_claim(cluster: Any) -> None:
    leader, _, wire = cluster
    leader.activate(0, token=5)
    assert {m["epoch"] for _, m in wire.to_nodes if m["t"] == p.REPORT_REQUEST} == {5}
    leader.report({**report("a", []), "epoch": 10**9})
    for host in ("b", "c"):
        leader.report(report(host, []))
    assert leader.ready and leader.epoch == 5
    leader.handle(get("k", "1"))
    assert {m["epoch"] for _, m in wire.spawns()} == {5}


def test_a_malformed_request_deferred_during_a_rebuild_costs_none_of_the_messages_after_it(cluster: Any) -> None:
    leader, _, wire = cluster
    leader.activate(0)
    leader.report(report("a", []))
    leader.handle(get("x", "1"))
    leader.handle({"t": p.GET, "n": "default", "k": "no-reply-queue"})  # a client's, so not signed: no r, no c
    leader.handle(get("y", "2"))
    leader.report(report("b", []))
    leader.report(report("c", [["default", "on-c", 5, "s5"]]))
    assert leader.ready
    assert {m["k"]: m["w"] for _, m in wire.spawns()} == {"x": [["client", "1"]], "y": [["client", "2"]]}
    leader.handle(search("on-c", "4"))
    assert wire.answer("4")["v"] == ["c", 5]


def test_callers_of_a_key_whose_start_hangs_are_forgotten_once_they_have_given_up(cluster: Any) -> None:
    leader, _, wire = cluster
    host, spawn = place_one(leader, wire)  # caller "1", told to the worker with the order
    now = time.time()
    for i in range(1000):
        leader.handle({**get("k", f"gave-up-{i}"), "d": now + 1})
    leader.handle({**get("k", "patient"), "d": now + 60})
    leader.handle({**get("k", "patient"), "d": now + 60})  # asked again: one waiter, one answer
    leader.expire(now + 2)
    assert sum(len(e.waiters) for e in leader._starting.values()) == 2  # "1" and "patient"
    leader.handle({"t": p.SPAWNED, "n": "default", "k": "k", "node": host, "pid": 7, "sid": spawn["sid"]})
    assert [m["c"] for _, m in wire.replies] == ["patient"]  # the worker answers "1" itself


def test_a_leader_rebuilt_from_reports_knows_each_keys_init_args(cluster: Any) -> None:
    leader, _, wire = cluster
    leader.activate(0)
    # "a", parallel to "procs": a list per entry, or null where the worker does not know them.
    leader.report(report("a", [["default", "k1", 101, "s1"], ["default", "k2", None, "s2"]],
                         a=[[1, {"x": "y"}], None]))
    leader.report(report("b", [["default", "k3", 201, "s3"]], a=[[]]))
    leader.report(report("c", [["default", "k4", 301, "s4"]]))  # a worker older than "a": unknown
    assert leader.ready
    assert [leader.args_of("default", k) for k in ("k1", "k2", "k3", "k4")] == [[1, {"x": "y"}], None, [], None]
    assert leader.info()["with_args"] == 2
    # A key placed later keeps the args of the get that placed it, for as long as it lives.
    leader.handle({**get("k5", "5"), "a": ["init"]})
    ((host, spawn),) = wire.spawns()
    assert spawn["a"] == ["init"]
    leader.handle({"t": p.SPAWNED, "n": "default", "k": "k5", "node": host, "pid": 501, "sid": spawn["sid"]})
    assert leader.args_of("default", "k5") == ["init"]


def test_a_report_without_args_or_with_args_of_another_shape_still_rebuilds_the_table(cluster: Any) -> None:
    leader, _, wire = cluster
    leader.activate(0)
    procs = [["default", "k1", 101, "s1"], ["default", "k2", 102, "s2"]]
    leader.report(report("a", procs, a=[[1]]))  # not parallel to procs: no args, the registry counts
    leader.report(report("b", [["default", "k3", 201, "s3"]], a="nonsense"))
    leader.report(report("c", [["default", "k4", 301, "s4"]], a=[{"not": "a list"}]))
    assert leader.ready
    for k, where in (("k1", ["a", 101]), ("k2", ["a", 102]), ("k3", ["b", 201]), ("k4", ["c", 301])):
        leader.handle(search(k, k))
        assert wire.answer(k)["v"] == where
        assert leader.args_of("default", k) is None
    # Reconciliation learns the args of a key it had without (its worker was upgraded meanwhile).
    leader.report(report("a", procs, q=10, a=[[1], [2]]))
    assert [leader.args_of("default", k) for k in ("k1", "k2")] == [[1], [2]]


# -- restart policies (issue 12) ------------------------------------------------------------
class Events:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, type_: str, **fields: Any) -> None:
        self.sent.append((type_, fields))

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [f for t, f in self.sent if t == type_]


def restarting(restart: str, max_restarts: int = 3) -> tuple[Leader, Members, Wire, Events]:
    """A ready leader on "a" of three workers whose "default" keys have the policy ``restart``."""
    from forseti_celery.core.conf import KeyPolicy
    members = Members(node_timeout=8.0)
    for host in ("a", "b", "c"):
        beat(members, host)
    wire, events = Wire(), Events()
    policy = KeyPolicy(restart=restart, max_restarts=max_restarts, restart_window=60.0)
    leader = Leader("a", members, wire.node, wire.reply, lambda name: policy if name == "default" else None, events)
    leader.activate(0)
    for host in ("a", "b", "c"):
        leader.report(report(host, []))
    return leader, members, wire, events


def live(leader: Leader, wire: Wire, key: str, pid: int, args: list[Any] | None = None) -> tuple[str, str]:
    """Place ``key`` (with ``args``) and report it started as ``pid``: its worker and sid."""
    leader.handle({**get(key, f"get-{key}-{pid}"), "a": args or [key]})
    host, spawn = wire.spawns()[-1]
    leader.handle({"t": p.SPAWNED, "n": "default", "k": key, "node": host, "sid": spawn["sid"], "pid": pid})
    return host, spawn["sid"]


def exited(key: str, host: str, pid: int, sid: str, reason: str) -> dict[str, Any]:
    return {"t": p.EXITED, "n": "default", "k": key, "node": host, "pid": pid, "sid": sid, "reason": reason,
            "code": 0, "stoppers": []}


@pytest.mark.parametrize(("restart", "reason", "restarted"), [
    ("temporary", "crash: ValueError: x", False), ("temporary", "killed by signal 9", False),
    ("transient", "crash: ValueError: x", True), ("transient", "killed by signal 9", True),
    ("transient", "exit code 1", True), ("transient", "shutdown", True),
    ("transient", "stop", False), ("transient", "normal", False), ("transient", "idle", False),
    ("transient", "duplicate", False),
    ("permanent", "normal", True), ("permanent", "idle", True), ("permanent", "crash: E: x", True),
    ("permanent", "stop", False), ("permanent", "duplicate", False),
])
def test_a_key_is_restarted_with_its_args_after_an_end_its_policy_restarts(restart: str, reason: str,
                                                                         restarted: bool) -> None:
    leader, _, wire, events = restarting(restart)
    host, sid = live(leader, wire, "k", 10, [1, {"x": 2}])
    before = len(wire.spawns())
    leader.handle(exited("k", host, 10, sid, reason))
    spawns = wire.spawns()[before:]
    if not restarted:
        assert spawns == [] and leader.info()["keys"] == 0
        return
    ((to, spawn),) = spawns
    assert to != "a"  # never held by the leader's own worker: it would die with it, unknown to the next
    assert (spawn["a"], spawn["w"], spawn["after"], spawn["restarts"]) == ([1, {"x": 2}], [], 0.1, 1)
    # During the back-off the key is starting: a get_key waits for the restart, never makes a second one.
    leader.handle(get("k", "during"))
    assert len(wire.spawns()) == before + 1 and wire.answer("during") is None
    leader.handle({"t": p.SPAWNED, "n": "default", "k": "k", "node": to, "sid": spawn["sid"], "pid": 11})
    assert wire.answer("during")["v"] == [to, 11]
    assert events.of("forseti-process-restarted") == [
        {"name": "default", "key": "k", "node": to, "child_pid": 11, "restarts": 1, "reason": reason}]


def test_restarts_back_off_doubling_and_past_max_restarts_the_key_stays_down_with_a_given_up_event() -> None:
    leader, _, wire, events = restarting("transient", max_restarts=3)
    host, sid = live(leader, wire, "k", 10)
    pid = 10
    for n, backoff in enumerate([0.1, 0.2, 0.4], start=1):
        leader.handle(exited("k", host, pid, sid, "crash: E: x"))
        host, spawn = wire.spawns()[-1]
        assert (spawn["after"], spawn["restarts"]) == (backoff, n)
        pid, sid = pid + 1, spawn["sid"]
        leader.handle({"t": p.SPAWNED, "n": "default", "k": "k", "node": host, "sid": sid, "pid": pid})
    before = len(wire.spawns())
    leader.handle(exited("k", host, pid, sid, "crash: E: x"))
    assert len(wire.spawns()) == before and leader.info()["keys"] == 0
    assert events.of("forseti-process-given-up") == [
        {"name": "default", "key": "k", "restarts": 3, "reason": "crash: E: x"}]
    assert (leader.info()["restarted"], leader.info()["given_up"]) == (3, 1)


def test_a_dead_worker_s_keys_are_restarted_elsewhere_and_a_restart_it_held_is_placed_again() -> None:
    leader, members, wire, events = restarting("transient")
    host, sid = live(leader, wire, "k", 10)
    assert host == "a"  # the least-used worker, ties by hostname: the leader's own
    leader.handle(exited("k", host, 10, sid, "crash: E: x"))
    held_on, spawn = wire.spawns()[-1]
    assert held_on == "b"
    members.remove("b")
    leader.node_lost("b")  # the restart's holder dies during its back-off: placed again (on c)
    to, again = wire.spawns()[-1]
    assert to == "c" and again["restarts"] == 1 and again["sid"] != spawn["sid"]
    leader.handle({"t": p.SPAWNED, "n": "default", "k": "k", "node": "c", "sid": again["sid"], "pid": 12})
    members.remove("c")
    leader.node_lost("c")  # a live transient key's worker dies: restarted
    to, third = wire.spawns()[-1]
    assert to == "a" and third["restarts"] == 2  # only the leader's own worker is left
    assert [e["reason"] for e in events.of("forseti-process-restarted")] == ["crash: E: x"]


def test_a_new_leader_rebuilds_a_held_restart_from_its_workers_report_with_its_count() -> None:
    leader, _, wire, events = restarting("transient")
    leader.deactivate()
    leader.activate(0)
    leader.report(report("a", []))
    leader.report(report("b", [["default", "k", None, "s9"]], a=[["x"]], restarts=[2]))
    leader.report(report("c", []))
    assert leader.args_of("default", "k") == ["x"]
    leader.handle(get("k", "1"))
    assert wire.spawns() == []  # starting: its caller waits for the held restart
    leader.handle({"t": p.SPAWNED, "n": "default", "k": "k", "node": "b", "sid": "s9", "pid": 5})
    assert wire.answer("1")["v"] == ["b", 5]
    assert events.of("forseti-process-restarted") == [
        {"name": "default", "key": "k", "node": "b", "child_pid": 5, "restarts": 2, "reason": "unknown"}]


def test_a_successor_restarts_the_keys_a_dead_leaders_heartbeats_listed_for_its_own_worker() -> None:
    from forseti_celery.core.conf import KeyPolicy
    members = Members(node_timeout=8.0)
    for host in ("a", "b", "c"):
        beat(members, host)
    wire, events = Wire(), Events()
    policy = KeyPolicy(restart="transient")
    leader = Leader("b", members, wire.node, wire.reply, lambda name: policy, events)
    # "a" led: its beats listed the restartable keys of its own worker (the latest beat counts).
    leader.restarts.heard("a", True, [["default", "old", [0], 0]])
    leader.restarts.heard("a", True, [["default", "k1", [1], 0], ["default", "k2", [2], 4], ["bad"]])
    leader.activate(0)  # "a" is still a member: awaited
    leader.report(report("b", []))
    leader.report(report("c", [["default", "k2", 77, "s"]], a=[[2]]))  # someone runs k2 already
    members.remove("a")
    leader.node_lost("a")  # died before it reported to us
    assert leader.ready
    assert [(m["k"], m["a"], m["restarts"], h) for h, m in wire.spawns()] == [("k1", [1], 1, "c")]
    # A leader that did report (it handed the role over and stopped) leaves only its exit reports.
    leader.restarts.heard("c", True, [["default", "k3", [3], 0]])
    members.remove("c")
    leader.node_lost("c")
    # k1's held restart is placed again, k2 (live on c) restarted; k3, known only from beats, not.
    assert sorted((m["k"], h) for h, m in wire.spawns()) == [("k1", "b"), ("k1", "c"), ("k2", "b")]
