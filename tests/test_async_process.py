"""Keyed processes written with ``async def`` (issue 14): over a real pipe from a forked child, and
on real workers (both brokers): handled one at a time in order, background tasks, ``areceive``,
sync and async hooks mixed, crashes, timers, and memory per idle process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from forseti_celery.child import runtime as child_main
from forseti_celery.core import process
from forseti_celery.core import protocol as p
from forseti_celery.testing import wait_for
from tests.async_app import Background, Mixed, Ordered, SyncIdle, async_function

from .test_child import _fork_spare, _kill, _wait_exit

# -- one forked child, over a real pipe --------------------------------------------------------------


def _start(target: Any, *args: Any) -> tuple[int, Any]:
    pid, conn = _fork_spare(child_main.Lifeline(fence_after=60.0, check_every=0.1), target)
    conn.send_bytes(p.encode([{"t": "assign", "n": "x", "k": "k", "a": list(args)}]))
    assert conn.poll(5) and p.decode(conn.recv_bytes()) == [{"t": "started"}]
    return pid, conn


def _calls(conn: Any, *payloads: Any) -> None:
    """Several calls in one frame, as a worker writes what it has."""
    conn.send_bytes(b"\n".join(p.encode([{"t": "call", "n": "x", "k": "k", "r": "r", "c": f"c{i}"}]) + b"\t"
                               + json.dumps(m).encode() for i, m in enumerate(payloads)))


def _answers(conn: Any, n: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len(got) < n:
        assert conn.poll(10), f"{len(got)} of {n} answers"
        got += [m for m in p.decode(conn.recv_bytes()) if m["t"] == "reply"]
    return got


def _call(conn: Any, msg: Any) -> Any:
    _calls(conn, msg)
    answer = _answers(conn, 1)[0]
    assert "error" not in answer, answer
    return p.payload(answer)


def test_an_async_process_over_its_pipe_answers_calls_in_order_one_at_a_time_though_its_handler_awaits() -> None:
    pid, conn = _start(Ordered)
    try:
        _calls(conn, *[["a", i, 0.02 if i % 2 else 0.0] for i in range(10)])
        answers = _answers(conn, 10)
        assert [a["c"] for a in answers] == [f"c{i}" for i in range(10)]
        assert [p.payload(a) for a in answers] == list(range(1, 11))
        log = _call(conn, "log")
        assert log == [[edge, "a", i] for i in range(10) for edge in ("in", "out")]
        conn.send_bytes(p.encode([{"t": "stop", "reason": "test"}]))
        assert _wait_exit(pid, 5.0) == 0
        assert p.decode(conn.recv_bytes()) == [{"t": "exit", "reason": "test"}]
    finally:
        _kill(pid)
        conn.close()


def test_an_async_process_runs_its_background_task_between_messages_and_cancels_it_after_terminate(
        tmp_path: Path) -> None:
    path = tmp_path / "notes"
    pid, conn = _start(Background, str(path))
    try:
        first = _call(conn, "ticks")
        wait_for(lambda: _call(conn, "ticks") > first + 3, 10, 0.02, "the background task does not run")
        # A timer set by a task while the loop waits for a message wakes it.
        assert _call(conn, "await-timer") == "set"
        wait_for(lambda: _call(conn, "infos") == ["timer from a task"] or None, 10, 0.05)
        conn.send_bytes(p.encode([{"t": "stop", "reason": "test"}]))
        assert _wait_exit(pid, 5.0) == 0
        notes = [json.loads(line) for line in path.read_text().splitlines()]
        assert [n[0] for n in notes] == ["terminate", "cancelled"]
        assert notes[0][1:] == ["test", False]  # terminate ran while the task still ran
        assert notes[1][2] is True  # then the task was cancelled
    finally:
        _kill(pid)
        conn.close()


def test_a_failing_background_task_crashes_its_process_as_a_handler_would() -> None:
    pid, conn = _start(Background, "")
    try:
        assert _call(conn, "fail") == "failing"
        assert _wait_exit(pid, 5.0) == 1
        got = p.decode(conn.recv_bytes())
        assert got == [{"t": "exit", "reason": "crash: KeyError: 'from a background task'"}]
    finally:
        _kill(pid)
        conn.close()


def test_a_crash_in_an_async_handler_answers_the_call_crash_and_ends_the_process() -> None:
    pid, conn = _start(Ordered)
    try:
        _calls(conn, {"crash": "boom"})
        answer = _answers(conn, 1)[0]
        assert (answer["error"], answer["type"], answer["msg"]) == ("crash", "ValueError", "boom")
        assert _wait_exit(pid, 5.0) == 1
        assert p.decode(conn.recv_bytes()) == [{"t": "exit", "reason": "crash: ValueError: boom"}]
    finally:
        _kill(pid)
        conn.close()


def test_a_mixed_process_takes_its_timer_through_the_default_handle_info_to_its_sync_handle_cast() -> None:
    pid, conn = _start(Mixed)
    try:
        conn.send_bytes(p.encode([{"t": "cast", "n": "x", "k": "k"}]) + b'\t"a cast"')
        wait_for(lambda: _call(conn, "seen") == ["a cast", "from a timer"] or None, 10, 0.02)
    finally:
        _kill(pid)
        conn.close()


def test_an_async_function_gets_areceive_with_a_timeout_and_its_timers(tmp_path: Path) -> None:
    path = tmp_path / "notes"
    pid, conn = _start(async_function, str(path))
    try:
        wait_for(lambda: (path.exists() and len(path.read_text().splitlines()) >= 2) or None, 10, 0.02)
        conn.send_bytes(p.encode([{"t": "cast", "n": "x", "k": "k"}]) + b'\t{"a": 1}')
        conn.send_bytes(p.encode([{"t": "cast", "n": "x", "k": "k"}]) + b'\t"stop"')
        assert _wait_exit(pid, 5.0) == 0
        notes = [json.loads(line)[0] for line in path.read_text().splitlines()]
        assert notes == ["tick", None, {"a": 1}, "returned"]
    finally:
        _kill(pid)
        conn.close()


def test_areceive_and_create_task_refuse_outside_an_async_keyed_process() -> None:
    import asyncio

    with pytest.raises(RuntimeError, match="only available inside a keyed process"):
        asyncio.run(process.areceive(0))
    assert process.is_async(Ordered) and process.is_async(Mixed) and process.is_async(async_function)
    assert not process.is_async(SyncIdle) and not process.is_async(len)
