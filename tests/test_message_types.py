"""The typed messages: each kind writes the bytes its senders always have (a rolling upgrade mixes
old and new workers and clients on one broker) and reads back what it wrote, whatever a newer
sender adds."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from forseti_celery.core import messages as m
from forseti_celery.core import pipe
from forseti_celery.core import protocol as p
from forseti_celery.core import worker_messages as w
from forseti_celery.core.errors import InvalidMessage

#: Each kind with the bytes the code before the typed messages wrote for it, dict literal by dict
#: literal (client.py, leader.py, registry.py, children.py, child.py at 78b9b6d).
GOLDEN: list[tuple[Any, bytes]] = [
    (m.Get("n1", "k1", [1, "x"], "rq", "c1", 12.5),
     b'{"t":"get","n":"n1","k":"k1","a":[1,"x"],"r":"rq","c":"c1","d":12.5}'),
    (m.Search("n1", "k1", "rq", "c1", 12.5), b'{"t":"search","n":"n1","k":"k1","r":"rq","c":"c1","d":12.5}'),
    (m.Metrics("rq", "c1", 12.5), b'{"t":"metrics","r":"rq","c":"c1","d":12.5}'),
    (m.StopKey("n1", "k1", 42, "w1", "stop", 4.0, "rq", "c1", 12.5),
     b'{"n":"n1","k":"k1","p":42,"t":"stop_key","node":"w1","reason":"stop","grace":4.0,"r":"rq","c":"c1",'
     b'"d":12.5}'),
    (m.Cast("n1", "k1", 42), b'{"n":"n1","k":"k1","p":42,"t":"cast"}'),
    (m.Call("n1", "k1", 42, "rq", "c1", 12.5), b'{"n":"n1","k":"k1","p":42,"t":"call","r":"rq","c":"c1","d":12.5}'),
    (m.Cast("n1", "k1", 42, key_addressed=True, args=[1], seq=7, reply_to="rq"),
     b'{"n":"n1","k":"k1","p":42,"t":"cast","ka":1,"a":[1],"q":7,"r":"rq"}'),  # forseti_celery.send: issue 12
    (m.Call("n1", "k1", 42, "rq", "c1", 12.5, key_addressed=True, args=[], seq=8),
     b'{"n":"n1","k":"k1","p":42,"t":"call","r":"rq","c":"c1","d":12.5,"ka":1,"a":[],"q":8}'),
    (m.Moved("n1", "k1", "w1", 42, "w2", 43, 8),
     b'{"t":"moved","n":"n1","k":"k1","node":"w1","p":42,"to":["w2",43],"q":8}'),
    (m.Followed("n1", "k1", 42, "rq"), b'{"t":"followed","n":"n1","k":"k1","p":42,"r":"rq"}'),
    (m.Stop("n1", "k1", 42, "duplicate"), b'{"t":"stop","n":"n1","k":"k1","p":42,"reason":"duplicate"}'),
    (m.StopKey("n1", "k1", 42, "w1", "stop", 4.0, "rq", "c1", 12.5).forwarded(),
     b'{"n":"n1","k":"k1","p":42,"t":"stop","node":"w1","reason":"stop","grace":4.0,"r":"rq","c":"c1","d":12.5}'),
    (m.Reply.ok("c1", ["w1", 42]), b'{"t":"reply","c":"c1","v":["w1",42]}'),
    (m.Reply.ok("c1", None), b'{"t":"reply","c":"c1","v":null}'),
    (m.Reply.fail("c1", "gone", "keyed process 'k1' (n1) has exited"),
     b'{"t":"reply","c":"c1","error":"gone","msg":"keyed process \'k1\' (n1) has exited"}'),
    (m.Reply("c1", reply_to="rq"), b'{"t":"reply","r":"rq","c":"c1"}'),  # a keyed process's, its answer after
    (m.Reply("c1", error="crash", text="boom", exc_type="ValueError", reply_to="rq"),
     b'{"t":"reply","r":"rq","c":"c1","error":"crash","type":"ValueError","msg":"boom"}'),
    (w.Spawned("n1", "k1", "w1", "s1", 42), b'{"t":"spawned","n":"n1","k":"k1","node":"w1","sid":"s1","pid":42}'),
    (w.SpawnFailed("n1", "k1", "w1", "s1", "unavailable"),
     b'{"t":"spawn_failed","n":"n1","k":"k1","node":"w1","sid":"s1","error":"unavailable"}'),
    (w.SpawnFailed("n1", "k1", "w1", "s1", "start", "ValueError", "no"),
     b'{"t":"spawn_failed","n":"n1","k":"k1","node":"w1","sid":"s1","error":"start","type":"ValueError",'
     b'"msg":"no"}'),
    (w.Exited("n1", "k1", "w1", 42, [["rq", "c1"]], "s1", "normal", 0),
     b'{"t":"exited","n":"n1","k":"k1","node":"w1","sid":"s1","pid":42,"reason":"normal","code":0,'
     b'"stoppers":[["rq","c1"]]}'),
    (w.Exited("n1", "k1", "w1", None, [["rq", "c1"]]),
     b'{"t":"exited","n":"n1","k":"k1","node":"w1","pid":null,"stoppers":[["rq","c1"]]}'),
    (w.Ping("w1", "x1"), b'{"t":"ping","node":"w1","nonce":"x1"}'),
    (w.Report("w1", 3, [["n1", "k1", 42, "s1"]], 7),
     b'{"t":"report","node":"w1","epoch":3,"procs":[["n1","k1",42,"s1"]],"q":7}'),
    (w.Report("w1", 3, [["n1", "k1", 42, "s1"], ["n1", "k2", None, "s2"]], 7, [[1, "x"], None]),
     b'{"t":"report","node":"w1","epoch":3,"procs":[["n1","k1",42,"s1"],["n1","k2",null,"s2"]],"q":7,'
     b'"a":[[1,"x"],null]}'),
    (w.Spawn("n1", "k1", [], "s1", 3, "w0", [["rq", "c1"]]),
     b'{"t":"spawn","n":"n1","k":"k1","a":[],"sid":"s1","epoch":3,"leader":"w0","w":[["rq","c1"]]}'),
    (w.Spawn("n1", "k1", [1], "s1", 3, "w0", [], 0.4, 2),  # a restart held for its back-off: issue 12
     b'{"t":"spawn","n":"n1","k":"k1","a":[1],"sid":"s1","epoch":3,"leader":"w0","w":[],"after":0.4,"restarts":2}'),
    (w.Report("w1", 3, [["n1", "k1", 42, "s1"], ["n1", "k2", None, "s2"]], 7, [[1], [2]], [0, 2]),
     b'{"t":"report","node":"w1","epoch":3,"procs":[["n1","k1",42,"s1"],["n1","k2",null,"s2"]],"q":7,'
     b'"a":[[1],[2]],"restarts":[0,2]}'),
    (w.Exited("n1", "k1", "w1", 42, [], "s1", "handoff", 0, b'{"n":[1,2]}', "w2", 12.5, [1]),  # a handoff: issue 13
     b'{"t":"exited","n":"n1","k":"k1","node":"w1","sid":"s1","pid":42,"reason":"handoff","code":0,"stoppers":[],'
     b'"to":"w2","ho":12.5,"a":[1]}\t{"n":[1,2]}'),
    (w.Spawn("n1", "k1", [1], "s1", 3, "w0", [], state=b'{"n":[1,2]}', source="w1", since=12.5),  # issue 13
     b'{"t":"spawn","n":"n1","k":"k1","a":[1],"sid":"s1","epoch":3,"leader":"w0","w":[],"src":"w1","ho":12.5}'
     b'\t{"n":[1,2]}'),
    (w.Move("n1", "k1", 42, "w2", "w0", 3), b'{"t":"move","n":"n1","k":"k1","p":42,"to":"w2","leader":"w0","epoch":3}'),
    (w.ReportRequest("w0", 3, 7), b'{"t":"report?","leader":"w0","epoch":3,"q":7}'),
    (w.Leads("w0", 3, "x1"), b'{"t":"leads","leader":"w0","epoch":3,"nonce":"x1"}'),
    (w.Heartbeat("w1", "i1", 5, True, ["n1"], 2, False, 3, 99, "box"),
     b'{"t":"hb","node":"w1","inc":"i1","seq":5,"eligible":true,"names":["n1"],"count":2,"leader":false,'
     b'"epoch":3,"pid":99,"host":"box"}'),
    (w.Heartbeat("w1", "i1", 5, True, ["n1"], 2, True, 3, 99, "box", [["n1", "k1", [1], 2]]),  # issue 12
     b'{"t":"hb","node":"w1","inc":"i1","seq":5,"eligible":true,"names":["n1"],"count":2,"leader":true,'
     b'"epoch":3,"pid":99,"host":"box","keep":[["n1","k1",[1],2]]}'),
    (w.Bye("w1", "i1"), b'{"t":"bye","node":"w1","inc":"i1"}'),
    (pipe.Assign("n1", "k1", [1]), b'{"t":"assign","n":"n1","k":"k1","a":[1]}'),
    (pipe.StopChild("shutdown", 4.0), b'{"t":"stop","reason":"shutdown","grace":4.0}'),
    (pipe.Started(), b'{"t":"started"}'),
    (pipe.InitError("ValueError", "no"), b'{"t":"init_error","type":"ValueError","msg":"no"}'),
    (pipe.Exit("normal"), b'{"t":"exit","reason":"normal"}'),
    (pipe.Touch(), b'{"t":"touch"}'),
    (pipe.Assign("n1", "k1", [1], {"n": 2}, 3, "s1"),
     b'{"t":"assign","n":"n1","k":"k1","a":[1],"state":{"n":2},"epoch":3,"sid":"s1"}'),
    (pipe.Handoff(), b'{"t":"handoff"}'),
    (pipe.HandedOff({"n": [1, 2]}), b'{"t":"handed_off","state":{"n":[1,2]}}'),
    (pipe.HandoffFailed("ValueError", "no"), b'{"t":"handoff_failed","type":"ValueError","msg":"no"}'),
]


@pytest.mark.parametrize(("msg", "wire"), GOLDEN, ids=[f"{type(g[0]).__name__}-{i}" for i, g in enumerate(GOLDEN)])
def test_each_kind_writes_the_bytes_its_senders_always_wrote_and_reads_them_back(msg: Any, wire: bytes) -> None:
    assert p.encode([msg.to_wire()]) == wire
    (decoded,) = p.decode(wire, routed=False)
    back = type(msg).from_wire(decoded)
    assert back == msg
    assert back.to_wire() == msg.to_wire()


_FIELDS = ("PAYLOAD", "TYPE", "NAME", "KEY", "PID", "REPLY_TO", "CORR", "KEY_ADDRESSED", "ARGS", "SEQ")  # field names


def test_every_message_type_of_the_protocol_has_exactly_one_kind() -> None:
    types = {v for k, v in vars(m).items() if k.isupper() and isinstance(v, str) and k not in _FIELDS}
    assert set(w.WIRE_KINDS) == types
    assert {p.GET, p.CAST, p.REPLY, p.HEARTBEAT} <= set(w.WIRE_KINDS)
    assert set(pipe.PIPE_KINDS) == {pipe.ASSIGN, pipe.STOP, pipe.STARTED, pipe.INIT_ERROR, pipe.EXIT, pipe.TOUCH,
                                    pipe.HANDOFF, pipe.HANDED_OFF, pipe.HANDOFF_FAILED}
    kinds = {type(g[0]) for g in GOLDEN}
    assert set(w.WIRE_KINDS.values()) | set(pipe.PIPE_KINDS.values()) == kinds  # each pinned above


def test_a_kind_reads_a_message_with_fields_a_newer_sender_added() -> None:
    (decoded,) = p.decode(b'{"t":"report","node":"w1","epoch":3,"procs":[],"q":1,"a":[[1]],"zz":{"new":1}}')
    assert w.from_wire(decoded) == w.Report("w1", 3, [], 1, [[1]])
    (decoded,) = p.decode(b'{"n":"n1","k":"k1","p":42,"t":"cast","later":true}\t{"x":1}')
    cast = w.from_wire(decoded)
    assert isinstance(cast, m.Cast) and (cast.name, cast.key, cast.pid) == ("n1", "k1", 42)
    assert p.payload({"m": cast.payload}) == {"x": 1}  # the payload stays as it came, decoded on demand


def test_a_message_without_a_field_its_kind_needs_is_invalid_and_names_it() -> None:
    with pytest.raises(InvalidMessage, match="'spawned' message without 'pid'"):
        w.from_wire({"t": "spawned", "n": "n1", "k": "k1", "node": "w1", "sid": "s1"})
    with pytest.raises(InvalidMessage, match="unknown message type 'nope'"):
        w.from_wire({"t": "nope"})
    with pytest.raises(InvalidMessage, match="unknown pipe message type 'cast'"):
        pipe.from_pipe({"t": "cast"})


def test_a_reply_read_back_says_what_it_carries() -> None:
    (ok,) = p.decode(b'{"t":"reply","c":"c1","v":null}')
    assert m.Reply.from_wire(ok).value is None and m.Reply.from_wire(ok).error is None
    (answer,) = p.decode(b'{"t":"reply","r":"rq","c":"c1"}\t[1,2]')
    reply = m.Reply.from_wire(answer)
    assert reply.value is m.NO_VALUE and p.payload({"m": reply.payload}) == [1, 2]
    (call,) = p.decode(b'{"n":"n1","k":"k1","p":42,"t":"call","r":"rq","c":"c1","d":12.5}\t1')
    assert m.Call.caller(call) == ("rq", "c1") and m.Reply.corr_of(answer) == "c1"
    (failed,) = p.decode(b'{"t":"reply","c":"c1","error":"start","type":"ValueError","msg":"no"}')
    assert m.Reply.from_wire(failed) == m.Reply.fail("c1", "start", "no", "ValueError")


def test_messages_are_frozen_values_with_slots() -> None:
    for kind in (*w.WIRE_KINDS.values(), *pipe.PIPE_KINDS.values()):
        assert dataclasses.is_dataclass(kind) and "__slots__" in vars(kind), kind
    msg = m.Cast("n1", "k1", 42)
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.pid = 43
    assert msg == m.Cast("n1", "k1", 42) and hash(msg) == hash(m.Cast("n1", "k1", 42))


def test_a_key_addressed_cast_or_call_is_a_plain_one_to_a_reader_that_ignores_its_optional_fields() -> None:
    ka = m.Cast("n1", "k1", 42, key_addressed=True, args=[1], seq=7, reply_to="rq").to_wire()
    plain = {f: v for f, v in ka.items() if f in ("n", "k", "p", "t")}
    assert plain == m.Cast("n1", "k1", 42).to_wire() and list(ka)[:4] == list(plain)
    assert m.Cast.envelope("n1", "k1", 42, [1], 7, "rq") == ka
    call = m.Call("n1", "k1", 42, "rq", "c1", None, key_addressed=True, args=[], seq=3).to_wire()
    assert (call[m.KEY_ADDRESSED], call[m.SEQ], call[m.ARGS], call[m.REPLY_TO], call[m.CORR]) == (1, 3, [], "rq", "c1")
    with pytest.raises(InvalidMessage, match="'cast' message without 'q'"):
        m.Cast.from_wire({"t": "cast", "n": "n1", "k": "k1", "p": 42, "ka": 1})
    with pytest.raises(InvalidMessage, match="bad 'to'"):
        m.Moved.from_wire({"t": "moved", "n": "n1", "k": "k1", "node": "w1", "p": 1, "to": "w2", "q": 1})
