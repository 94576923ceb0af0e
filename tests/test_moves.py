"""The leader's side of handoffs and rebalancing on its own (no broker, issue 13): a handed-off key
starts elsewhere with its state only once its exit report came, is placed again with it if its
target refuses it, and a rebalance moves keys until counts differ by at most one, a batch at a time."""

from __future__ import annotations

from typing import Any

from forseti_celery.core import protocol as p
from forseti_celery.core import worker_messages as w
from forseti_celery.worker.leader import Leader
from forseti_celery.worker.rebalance import Rebalancer, _Request
from tests.test_leader import Wire, report, three_live_workers

STATE = b'{"n":[1,2]}'


def placed(leader: Leader, wire: Wire, key: str, host: str) -> tuple[str, int]:
    """``key`` live on ``host`` (its start reported): its sid and pid."""
    leader.handle(p.decode(p.encode([{"t": p.GET, "n": "default", "k": key, "a": [7], "r": "client",
                                     "c": f"get-{key}"}]))[0])
    sid = next(m["sid"] for h, m in wire.spawns() if m["k"] == key)
    node = next(h for h, m in wire.spawns() if m["k"] == key)
    assert node == host, (node, host)
    pid = 1000 + len(wire.spawns())
    leader.handle(w.Spawned("default", key, host, sid, pid).to_wire())
    return sid, pid


def exited(host: str, key: str, sid: str, pid: int, to: str | None = None) -> dict[str, Any]:
    """The exit report of a handed-off process, as the leader's consumer decodes it."""
    wire = w.Exited("default", key, host, pid, [], sid, w.REASON_HANDOFF, 0, STATE, to, 12.5, [7]).to_wire()
    (decoded,) = p.decode(p.encode([wire]))
    return decoded


def ready_leader() -> tuple[Leader, Wire]:
    leader, _, wire = three_live_workers()
    leader.activate(0)
    for host in ("a", "b", "c"):
        leader.report(report(host, []))
    return leader, wire


def test_a_handed_off_key_starts_on_another_worker_with_its_state_only_once_its_exit_report_came() -> None:
    leader, wire = ready_leader()
    sid, pid = placed(leader, wire, "k1", "a")
    before = len(wire.spawns())
    leader.handle(exited("a", "k1", sid, pid))
    ((host, spawn),) = wire.spawns()[before:]
    assert host != "a"  # the leaving worker is excluded
    again = w.Spawn.from_wire(p.decode(p.encode([spawn]))[0])
    assert (again.state, again.source, again.since, again.args) == (STATE, "a", 12.5, [7])


def test_a_handed_off_key_refused_by_its_target_is_placed_again_with_its_state() -> None:
    leader, wire = ready_leader()
    sid, pid = placed(leader, wire, "k1", "a")
    leader.handle(exited("a", "k1", sid, pid, to="b"))
    (host, spawn) = wire.spawns()[-1]
    assert host == "b"  # a move's target
    leader.handle(w.SpawnFailed("default", "k1", "b", spawn["sid"], "unavailable").to_wire())
    (host, spawn) = wire.spawns()[-1]
    assert host == "c" and w.Spawn.from_wire(p.decode(p.encode([spawn]))[0]).state == STATE


def test_a_rebalance_moves_movable_keys_a_batch_at_a_time_until_counts_differ_by_at_most_one() -> None:
    leader, wire = ready_leader()
    leader.rebalancer = Rebalancer("off", batch=2, timeout=30.0, movable=lambda name: True)
    for i in range(6):  # all on "a": "b" and "c" were not eligible yet
        for host in ("b", "c"):
            leader.members.exclude(host)
        placed(leader, wire, f"k{i}", "a")
    for host in ("b", "c"):
        leader.members.get(host).eligible = True  # type: ignore[union-attr]
    ask = _Request()  # what request() puts in for the leader's thread, and waits on
    leader.rebalancer._requests.put(ask)
    leader.expire()  # the leader's tick
    moves = [m for h, m in wire.to_nodes if m["t"] == p.MOVE]
    assert len(moves) == 2 and {m["to"] for m in moves} == {"b", "c"}  # a batch: two in flight
    for _ in range(6):
        moves = [m for h, m in wire.to_nodes if m["t"] == p.MOVE]
        for m in moves:
            entry = leader._table.get(("default", m["k"]))
            if entry is not None and entry.node == "a" and entry.pid == m["p"]:
                leader.handle(exited("a", m["k"], entry.sid, entry.pid, to=m["to"]))
                (host, spawn) = wire.spawns()[-1]
                leader.handle(w.Spawned("default", m["k"], host, spawn["sid"], 5000 + len(wire.spawns())).to_wire())
    assert sorted(leader._counts[h] for h in ("a", "b", "c")) == [2, 2, 2]
    assert ask.done.is_set() and len(ask.moved) == 4
    assert {(d["source"], d["target"]) for d in ask.moved} <= {("a", "b"), ("a", "c")}
