"""Snapshot, restore and the handoff, in real keyed processes driven over a real pipe (issue 13)."""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import billiard
import pytest

from forseti_celery import KeyedProcess
from forseti_celery.child import runtime as child_main
from forseti_celery.core import protocol as p
from forseti_celery.core.conf import ChildConfig
from forseti_celery.core.pipe import Assign, Handoff
from forseti_celery.core.process import is_movable
from forseti_celery.core.state import Checkpoints
from forseti_celery.testing import wait_for
from tests.test_child import _kill, _wait_exit


class Room(KeyedProcess):
    """Movable: its state is its members and its log."""

    def init(self, key: str, topic: str = "") -> None:
        self.topic, self.members, self.log = topic, set(), []
        self.inits = 1

    def handle_cast(self, msg: Any) -> None:
        if msg == "boom-snapshot":
            self.broken = True
        elif isinstance(msg, dict) and "big" in msg:
            self.log.append("x" * msg["big"])
        else:
            self.members.add(msg)
            self.log.append(msg)

    def handle_call(self, msg: Any) -> Any:
        if msg == "checkpoint":
            return self.checkpoint()
        if msg == "sizes":
            return [len(entry) for entry in self.log]
        return {"topic": self.topic, "members": sorted(self.members), "log": self.log, "inits": self.inits}

    def snapshot(self) -> Any:
        if getattr(self, "broken", False):
            raise ValueError("no snapshot today")
        return {"members": sorted(self.members), "log": self.log}

    def restore(self, state: Any) -> None:
        if state.get("explode"):
            raise RuntimeError("cannot restore that")
        self.members, self.log = set(state["members"]), state["log"]

    def terminate(self, reason: str) -> None:
        self.log.append(f"terminate {reason}")
        print(f"terminate {reason}", flush=True)


class Plain(KeyedProcess):
    def handle_call(self, msg: Any) -> Any:
        return msg


def _spare(target: type[KeyedProcess], config: ChildConfig | None = None,
           assign: Assign | None = None) -> tuple[int, Any]:
    """A spare keyed process running ``target`` (as a zygote forks them) and our end of its pipe;
    given ``assign`` (and started) if given."""
    ours, theirs = billiard.Pipe(duplex=True)
    parent = os.getpid()
    lifeline = child_main.Lifeline(fence_after=3600.0, check_every=1.0)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            ours.close()
            child_main.run(theirs, config or ChildConfig(), lifeline, lambda name: target, parent, [])
            code = 0
        finally:
            os._exit(code)
    theirs.close()
    if assign is not None:
        _send(ours, assign.to_wire())
        assert [m["t"] for m in _read(ours, "started")] == ["started"]
    return pid, ours


def _read(conn: Any, until: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """What the process sends, up to the first message of type ``until`` (payloads decoded)."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not any(m.get("t") == until for m in got):
        assert conn.poll(max(0.0, deadline - time.monotonic())), f"no {until!r} in {got}"
        batch = p.decode(conn.recv_bytes(), routed=False)
        p.decode_payloads(batch)
        got += batch
    return got


def _send(conn: Any, *messages: dict[str, Any]) -> None:
    conn.send_bytes(p.encode(list(messages)))


def _cast(msg: Any) -> dict[str, Any]:
    return {"t": "cast", "n": "room", "k": "r1", "m": msg}


def _call(msg: Any, corr: str = "c1") -> dict[str, Any]:
    return {"t": "call", "n": "room", "k": "r1", "r": "rq", "c": corr, "m": msg}


def _exit_code(pid: int, timeout: float = 10.0) -> int:
    code = _wait_exit(pid, timeout)
    if code is None:
        _kill(pid)
        raise AssertionError("the keyed process did not end")
    return code


def _answer(conn: Any) -> Any:
    (reply,) = [m for m in _read(conn, "reply") if m["t"] == "reply"]
    return reply.get("m", reply)


def test_a_class_is_movable_when_it_defines_snapshot_and_a_function_never_is() -> None:
    assert is_movable(Room) and not is_movable(Plain) and not is_movable(KeyedProcess)
    assert not is_movable(lambda key: None) and not is_movable(Room())


def test_a_handoff_takes_the_snapshot_after_every_earlier_message_and_ends_the_process_with_reason_handoff(
        ) -> None:
    pid, conn = _spare(Room, assign=Assign("room", "r1", ["chat"]))
    try:
        _send(conn, _cast("ann"), _cast("bob"), Handoff().to_wire(), _cast("never"))
        got = _read(conn, "exit")
        assert [m["t"] for m in got] == ["handed_off", "exit"]
        assert got[0]["state"] == {"members": ["ann", "bob"], "log": ["ann", "bob"]}
        assert got[1]["reason"] == "handoff"
        assert _exit_code(pid) == 0
    finally:
        conn.close()


def test_a_new_process_runs_init_with_its_args_then_restore_with_the_handed_state() -> None:
    pid, conn = _spare(Room)
    try:
        state = {"members": ["ann"], "log": ["ann", "hello"]}
        _send(conn, Assign("room", "r1", ["chat"], state, 4, "sid-2").to_wire())
        _read(conn, "started")
        _send(conn, _call("get"))
        assert _answer(conn) == {"topic": "chat", "members": ["ann"], "log": ["ann", "hello"], "inits": 1}
        _send(conn, {"t": "stop", "reason": "test"})
        assert _read(conn, "exit")[-1]["reason"] == "test"
        assert _exit_code(pid) == 0
    finally:
        conn.close()


def test_a_snapshot_that_raises_answers_handoff_failed_and_the_process_ends_as_a_shutdown(
        capfd: pytest.CaptureFixture[str]) -> None:
    pid, conn = _spare(Room, assign=Assign("room", "r1", []))
    try:
        _send(conn, _cast("boom-snapshot"), Handoff().to_wire())
        got = _read(conn, "exit")
        assert [m["t"] for m in got] == ["handoff_failed", "exit"]
        assert (got[0]["type"], got[0]["msg"], got[1]["reason"]) == ("ValueError", "no snapshot today", "shutdown")
        assert _exit_code(pid) == 0
        assert "terminate shutdown" in capfd.readouterr().out
    finally:
        conn.close()


def test_a_process_that_is_not_movable_answers_handoff_failed() -> None:
    pid, conn = _spare(Plain, assign=Assign("plain", "p1", []))
    try:
        _send(conn, Handoff().to_wire())
        got = _read(conn, "exit")
        assert [m["t"] for m in got] == ["handoff_failed", "exit"] and got[1]["reason"] == "shutdown"
        assert _exit_code(pid) == 0
    finally:
        conn.close()


def test_a_restore_that_raises_fails_the_start_as_init_raising_does() -> None:
    pid, conn = _spare(Room)
    try:
        _send(conn, Assign("room", "r1", [], {"explode": True}).to_wire())
        (error,) = _read(conn, "init_error")
        assert (error["type"], error["msg"]) == ("RuntimeError", "cannot restore that")
        assert _exit_code(pid) == 1
    finally:
        conn.close()


def test_a_five_megabyte_state_goes_out_and_comes_back_in_over_the_pipe() -> None:
    size = 5 * 1024 * 1024
    pid, conn = _spare(Room, assign=Assign("room", "r1", []))
    try:
        _send(conn, _cast({"big": size}), Handoff().to_wire())
        got = _read(conn, "exit")
        state = got[0]["state"]
        assert got[0]["t"] == "handed_off" and len(state["log"][0]) == size
        assert _exit_code(pid) == 0
    finally:
        conn.close()
    # The next incarnation, given that state:
    pid, conn = _spare(Room, assign=Assign("room", "r1", [], state))
    try:
        _send(conn, _call("sizes"))  # (a reply is bound by forseti_max_message_size: 4 MiB)
        assert _answer(conn) == [size]
        _send(conn, {"t": "stop", "reason": "test"})
        _read(conn, "exit")
        assert _exit_code(pid) == 0
    finally:
        conn.close()


@pytest.fixture
def store(redis_url: str) -> Any:
    namespace = f"t{uuid.uuid4().hex[:8]}"
    checkpoints = Checkpoints(redis_url, namespace)
    yield checkpoints
    checkpoints.close()


def _config(store: Checkpoints, every: float | None = None) -> ChildConfig:
    return ChildConfig(fence_after=3600.0, state_url=store.url, namespace=store.namespace, checkpoint_every=every)


def test_a_started_process_restores_from_the_stored_checkpoint_when_no_state_is_handed(store: Checkpoints) -> None:
    assert store.claim("room", "r1", (1, "old"))[0]
    assert store.write("room", "r1", (1, "old"), {"members": ["zed"], "log": ["zed"]})
    pid, conn = _spare(Room, _config(store), Assign("room", "r1", ["t"], None, 2, "new"))
    try:
        _send(conn, _call("get"))
        assert _answer(conn)["members"] == ["zed"]
        # It claimed the key: the old incarnation is refused, its own checkpoint is stored.
        assert not store.write("room", "r1", (1, "old"), {"members": [], "log": []})
        _send(conn, _cast("amy"), _call("checkpoint", "c2"))
        assert _answer(conn) is True
        stored = store.read("room", "r1")
        assert stored is not None and stored["state"]["members"] == ["amy", "zed"] and stored["sid"] == "new"
        # stop() deletes the checkpoint: the key is gone on purpose.
        _send(conn, {"t": "stop", "reason": "stop"})
        _read(conn, "exit")
        assert _exit_code(pid) == 0
        assert store.read("room", "r1") is None
    finally:
        conn.close()


@pytest.mark.parametrize("reason", ["idle", "shutdown"])
def test_passivation_and_shutdown_keep_the_checkpoint_with_the_latest_state(store: Checkpoints, reason: str) -> None:
    pid, conn = _spare(Room, _config(store), Assign("room", "r1", [], None, 1, "s1"))
    try:
        _send(conn, _cast("ann"), {"t": "stop", "reason": reason})
        _read(conn, "exit")
        assert _exit_code(pid) == 0
        stored = store.read("room", "r1")
        assert stored is not None and stored["state"] == {"members": ["ann"], "log": ["ann"]}
    finally:
        conn.close()


def test_checkpoint_every_stores_the_state_after_a_change_without_being_asked(store: Checkpoints) -> None:
    pid, conn = _spare(Room, _config(store, every=0.2), Assign("room", "r1", [], None, 1, "s1"))
    try:
        assert (store.read("room", "r1") or {}).get("state") is None
        _send(conn, _cast("ann"))
        deadline = time.monotonic() + 5
        while (store.read("room", "r1") or {}).get("state") != {"members": ["ann"], "log": ["ann"]}:
            assert time.monotonic() < deadline, store.read("room", "r1")
            time.sleep(0.02)
        _send(conn, {"t": "stop", "reason": "stop"})
        _read(conn, "exit")
        assert _exit_code(pid) == 0
    finally:
        conn.close()


def test_checkpoint_without_a_state_url_is_a_configuration_error_for_the_caller() -> None:
    pid, conn = _spare(Room, assign=Assign("room", "r1", []))
    try:
        _send(conn, _call("checkpoint"))
        reply = next(m for m in _read(conn, "reply") if m["t"] == "reply")
        assert reply["error"] == "crash" and "ConfigurationError" in reply["type"]
        assert "forseti_state_url" in reply["msg"]
        _exit_code(pid)
    finally:
        conn.close()


def test_a_movable_process_whose_checkpoint_store_cannot_be_reached_fails_to_start() -> None:
    config = ChildConfig(fence_after=3600.0, state_url="redis://127.0.0.1:1/0")  # nothing listens there
    pid, conn = _spare(Room, config)
    try:
        _send(conn, Assign("room", "r1", []).to_wire())
        (error,) = _read(conn, "init_error")
        assert error["type"].endswith("StateUnavailable") and "127.0.0.1:1" in error["msg"]
        assert _exit_code(pid) == 1
    finally:
        conn.close()


def test_a_handler_that_checkpointed_itself_sets_off_no_automatic_checkpoint(store: Checkpoints) -> None:
    pid, conn = _spare(Room, _config(store, every=0.1), Assign("room", "r1", [], None, 1, "s1"))
    try:
        _send(conn, _call("checkpoint"))
        assert _answer(conn) is True
        version = store.read("room", "r1")["version"]  # type: ignore[index]
        _send(conn, _cast("ann"))  # a change: stored automatically within the period
        wait_for(lambda: store.read("room", "r1")["version"] == version + 1, 5, 0.02,  # type: ignore[index]
                 "no automatic checkpoint")
        time.sleep(0.3)  # three periods with no change: nothing more is written
        assert store.read("room", "r1")["version"] == version + 1  # type: ignore[index]
        _send(conn, {"t": "stop", "reason": "stop"})
        _read(conn, "exit")
        assert _exit_code(pid) == 0
    finally:
        conn.close()
