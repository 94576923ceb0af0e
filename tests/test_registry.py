"""The core promise across three real prefork workers, on Redis and on RabbitMQ."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import celery
import pytest

import forseti_celery
from forseti_celery import (
    ForsetiTimeout,
    InvalidArgument,
    InvalidKey,
    InvalidMessage,
    KeyRef,
    ProcessGone,
    RemoteError,
    StartError,
    UnknownName,
)
from forseti_celery.testing import wait_for

from .helpers import Harness, alive, client_app, fresh, harness


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    url = request.getfixturevalue(f"{request.param}_url")
    with harness(url, tmp_path_factory.mktemp(request.param)) as h:
        yield h


def assert_freed(h: Harness, ref: KeyRef) -> None:
    """Within 2 s the key is free: search_key answers None and get_key makes a new process."""
    wait_for(lambda: h.forseti.search_key(ref.key, name=ref.name) is None, 2.0,
             message=f"{ref} still registered after its exit")
    again = h.forseti.get_key(ref.key, name=ref.name)
    assert again.pid != ref.pid
    assert again.call("get") == 0 if ref.name == "default" else True
    again.stop()


def test_get_key_creates_once_and_returns_the_same_ref(h: Harness) -> None:
    key = fresh("basic")
    ref = h.forseti.get_key(key)
    assert isinstance(ref, KeyRef) and ref.key == key and ref.name == "default"
    node, pid = ref
    assert (node, pid) == (ref.node, ref.pid) and node in h.forseti.get_metrics()
    assert h.forseti.get_key(key) == ref and hash(h.forseti.get_key(key)) == hash(ref)
    assert h.forseti.search_key(key) == ref
    assert ref.call("pid") == pid
    assert len(h.starts(key)) == 1
    ref.stop()


def test_search_key_never_creates(h: Harness) -> None:
    key = fresh("search")
    assert h.forseti.search_key(key) is None
    assert h.forseti.search_key(key) is None
    assert h.starts(key) == []


def test_get_key_passes_args_after_the_key(h: Harness) -> None:
    key = fresh("args")
    ref = h.forseti.get_key(key, args=(41, "extra"))
    assert ref.call("get") == 41
    assert h.starts(key)[0]["args"] == [41, "extra"]
    ref.stop()


def test_messages_from_one_client_arrive_in_order(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("order"))
    for i in range(200):
        ref.send(i)
    assert ref.call("seen") == list(range(200))
    ref.send("inc")
    ref.send("inc")
    assert ref.call("get") == 2
    ref.stop()


def test_module_functions_use_the_current_app(h: Harness) -> None:
    key = fresh("current")
    previous = celery.current_app._get_current_object()
    h.app.set_current()
    try:
        ref = forseti_celery.get_key(key)
        assert forseti_celery.search_key(key) == ref
        assert set(forseti_celery.get_metrics()) == set(h.forseti.get_metrics())
        assert forseti_celery.get_less_used_node() in forseti_celery.get_metrics()
        ref.stop()
    finally:
        previous.set_current()


def test_sixty_creations_on_three_workers_balance_exactly_and_stopping_them_empties_all(h: Harness) -> None:
    assert set(h.forseti.get_metrics().values()) == {0}
    refs = [h.forseti.get_key(f"load-{i}") for i in range(60)]
    hosts = [w.hostname for w in h.cluster.workers]
    held = {host: s["forseti"]["total"] for host, s in (h.app.control.inspect(hosts, timeout=2).stats() or {}).items()}
    assert h.forseti.get_metrics() == held, "the leader's counts differ from what the workers hold"
    assert sorted(h.forseti.get_metrics().values()) == [20, 20, 20]
    for node in h.forseti.get_metrics():
        assert sum(r.node == node for r in refs) == 20
    for r in refs:
        r.stop()
    assert set(h.forseti.get_metrics().values()) == {0}


def test_ties_go_to_the_first_hostname(h: Harness) -> None:
    metrics = h.forseti.get_metrics()
    assert set(metrics.values()) == {0}
    assert h.forseti.get_less_used_node() == min(metrics)
    ref = h.forseti.get_key(fresh("tie"))
    assert ref.node == min(metrics)
    ref.stop()


def test_a_slow_init_blocks_neither_other_keys_nor_lookups(h: Harness) -> None:
    slow_key = fresh("slow")
    with ThreadPoolExecutor(4) as pool:
        waiting = [pool.submit(h.forseti.get_key, slow_key, (3.0,), name="slow") for _ in range(3)]
        time.sleep(0.3)  # let the slow start begin
        t0 = time.monotonic()
        quick = h.forseti.get_key(fresh("quick"))
        assert h.forseti.search_key(slow_key, name="slow") is None
        assert quick.call("get") == 0
        fast = time.monotonic() - t0
        refs = {f.result(timeout=15) for f in waiting}
    assert fast < 1.5, f"other keys waited {fast:.2f} s behind a slow init"
    assert len(refs) == 1
    (ref,) = refs
    assert len(h.starts(slow_key)) == 1
    quick.stop()
    ref.stop()


def test_init_raising_is_a_start_error_and_leaves_nothing_registered(h: Harness) -> None:
    key = fresh("failing")
    with pytest.raises(StartError) as info:
        h.forseti.get_key(key, name="failing")
    assert info.value.exc_type == "ValueError" and info.value.exc_message == f"cannot start {key}"
    assert h.forseti.search_key(key, name="failing") is None
    assert sum(h.forseti.get_metrics().values()) == 0


def logged_with_traceback(h: Harness, line: str, error: str) -> str:
    """The worker log entry (from its line's start) containing ``line``, up to ``error`` ending its traceback."""
    def entry() -> str | None:
        for worker in h.cluster.workers:
            text = worker.log_text()
            start = text.find(line)
            if start >= 0 and error in text[start:]:
                return text[text.rfind("\n", 0, start) + 1:text.index(error, start) + len(error)]
        return None
    return wait_for(entry, 5, message=lambda: f"no {line!r} in the worker logs\n{h.cluster.log_tails()}")


def test_init_raising_is_logged_on_the_worker_with_key_name_and_traceback(h: Harness) -> None:
    key = fresh("failing-logged")
    with pytest.raises(StartError):
        h.forseti.get_key(key, name="failing")
    entry = logged_with_traceback(h, f"forseti: init of keyed process {key!r} (name 'failing') raised",
                                  f"ValueError: cannot start {key}")
    assert "ERROR" in entry.splitlines()[0]
    assert "Traceback (most recent call last)" in entry and "in init" in entry


def test_a_name_no_worker_knows_is_a_typed_error_in_bounded_time(h: Harness) -> None:
    t0 = time.monotonic()
    with pytest.raises(UnknownName):
        h.forseti.get_key("k", name="nobody-knows-me", timeout=10)
    assert time.monotonic() - t0 < 5


def test_bad_input_is_refused_before_anything_is_sent(h: Harness) -> None:
    with pytest.raises(InvalidKey):
        h.forseti.get_key(42)  # type: ignore[arg-type]
    with pytest.raises(InvalidKey):
        h.forseti.search_key(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidKey):
        h.forseti.get_key("x" * (h.forseti.settings.max_key_length + 1))
    with pytest.raises(InvalidMessage):
        h.forseti.get_key(fresh("bad-args"), args=(object(),))
    with pytest.raises(InvalidArgument):
        h.forseti.get_key("k", name=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        h.forseti.get_key("k", timeout=-1)
    ref = h.forseti.get_key(fresh("bad-msg"))
    with pytest.raises(InvalidMessage):
        ref.call({1, 2})
    with pytest.raises(InvalidMessage):
        ref.send(object())
    assert ref.call("seen") == []
    ref.stop()


def test_no_leader_is_a_timeout_not_a_hang(h: Harness) -> None:
    lonely = client_app(h.cluster.broker_url, f"forseti-nobody-{time.monotonic_ns()}")
    forseti = forseti_celery.Forseti.of(lonely)
    t0 = time.monotonic()
    with pytest.raises(ForsetiTimeout):
        forseti.get_key("k", timeout=1.0)
    with pytest.raises(ForsetiTimeout):
        forseti.get_metrics(timeout=0.5)
    assert time.monotonic() - t0 < 4
    forseti.close()


def test_unicode_keys_with_routing_characters_are_plain_text(h: Harness) -> None:
    keys = ["a.b", "*", "#", "a.*.#", "with space", "new\nline", "ключ-鍵-🔑", "x" * 1024, ""]
    refs = [h.forseti.get_key(k) for k in keys]
    assert [r.call("key") for r in refs] == keys
    assert [h.forseti.search_key(k) for k in keys] == refs
    assert len({r.pid for r in refs}) == len(keys)
    for r in refs:
        r.stop()


def test_a_cached_ref_is_dropped_when_its_exit_event_arrives(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("cached"))
    assert h.forseti.get_key(ref.key) is ref  # served from the cache
    os.kill(ref.pid, signal.SIGKILL)
    fresh_ref = wait_for(lambda: (r := h.forseti.get_key(ref.key)) != ref and r, 3.0,
                         message="get_key kept answering the killed process")
    assert fresh_ref.pid != ref.pid and fresh_ref.call("get") == 0
    fresh_ref.stop()
    assert h.forseti.get_key(ref.key) not in (ref, fresh_ref)
    h.forseti.search_key(ref.key).stop()  # type: ignore[union-attr]


def test_client_functions_are_safe_from_many_threads(h: Harness) -> None:
    keys = [fresh(f"thr{i}") for i in range(5)]
    with ThreadPoolExecutor(16) as pool:
        refs = list(pool.map(lambda i: h.forseti.get_key(keys[i % 5]), range(80)))
        answers = list(pool.map(lambda r: r.call(["ping", r.key]), refs))
    assert len(set(refs)) == 5
    assert answers == [["echo", ["ping", r.key]] for r in refs]
    for k in keys:
        assert len(h.starts(k)) == 1
    for r in set(refs):
        r.stop()


# -- every exit frees the key ---------------------------------------------------------------

def test_stop_runs_terminate_and_returns_once_the_key_is_free(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("stop"))
    ref.stop()
    assert h.forseti.search_key(ref.key) is None
    assert not alive(ref.pid)
    assert [e["reason"] for e in h.journal() if e["ev"] == "terminate" and e["key"] == ref.key] == ["stop"]
    ref.stop()  # stopping an exited process is a no-op
    assert_freed(h, ref)


def test_a_function_returning_frees_its_key(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("poll-return"), name="poller")
    ref.send("stop")
    assert_freed(h, ref)


def test_a_function_raising_frees_its_key(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("poll-raise"), name="poller")
    ref.send("raise")
    assert_freed(h, ref)


def test_os_exit_frees_the_key(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("exit"), name="poller")
    ref.send("exit")
    assert_freed(h, ref)


def test_kill_9_of_the_child_frees_the_key(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("kill"))
    os.kill(ref.pid, signal.SIGKILL)
    assert_freed(h, ref)


def test_a_crash_in_handle_call_is_a_remote_error_and_frees_the_key(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("crash"))
    with pytest.raises(RemoteError) as info:
        ref.call("crash")
    assert info.value.exc_type == "ValueError" and "asked to crash" in str(info.value)
    entry = logged_with_traceback(h, f"forseti: keyed process {ref.key!r} (name 'default') crashed",
                                  "ValueError: asked to crash")
    assert "ERROR" in entry.splitlines()[0]
    assert "Traceback (most recent call last)" in entry and "in handle_call" in entry
    assert_freed(h, ref)


def test_get_key_right_after_a_crash_or_process_gone_resolves_afresh(h: Harness) -> None:
    for i in range(10):
        ref = h.forseti.get_key(fresh(f"afresh{i}"))
        with pytest.raises(RemoteError):
            ref.call("crash")
        again = h.forseti.get_key(ref.key)  # no waiting: the exit reached the leader first
        assert again.pid != ref.pid
        with pytest.raises(ProcessGone):
            ref.call("get")
        assert h.forseti.get_key(ref.key) == again
        again.stop()


def test_a_crash_in_handle_cast_frees_the_key(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("cast-crash"))
    ref.send("crash")
    assert_freed(h, ref)


def test_call_on_an_exited_process_is_process_gone(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("gone"))
    ref.stop()
    with pytest.raises(ProcessGone):
        ref.call("get")
    newer = h.forseti.get_key(ref.key)
    with pytest.raises(ProcessGone):
        ref.call("get")  # the old ref does not reach the new process
    assert newer.call("get") == 0
    newer.stop()


def test_a_caller_waiting_when_the_process_dies_gets_process_gone(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("dies-during-call"))
    threading.Timer(0.3, os.kill, (ref.pid, signal.SIGKILL)).start()
    with pytest.raises(ProcessGone):
        ref.call({"sleep": 3}, timeout=5)
    assert_freed(h, ref)


def test_a_ref_survives_a_trip_through_task_arguments_and_results(h: Harness) -> None:
    key = fresh("task")
    ref = h.forseti.get_key(key)
    from_task = h.app.send_task("tests.app.lookup", args=[key]).get(timeout=20)
    assert isinstance(from_task, KeyRef) and from_task == ref and hash(from_task) == hash(ref)
    assert from_task.call("get") == 0
    kind, answer = h.app.send_task("tests.app.call_ref", args=[ref, "key"]).get(timeout=20)
    assert (kind, answer) == ("KeyRef", key)
    ref.stop()


def test_starts_and_exits_are_sent_as_worker_events(h: Harness) -> None:
    received: list[dict[str, object]] = []
    key = fresh("events")
    with h.app.connection_for_read() as conn:
        recv = h.app.events.Receiver(conn, handlers={"*": received.append})
        thread = threading.Thread(target=recv.capture, kwargs={"wakeup": False}, daemon=True)
        thread.start()
        wait_for(lambda: received, 10, message="no event at all reached the receiver")
        ref = h.forseti.get_key(key)
        ref.stop()
        mine = lambda kind: [e for e in received if e.get("type") == kind and e.get("key") == key]  # noqa: E731
        wait_for(lambda: mine("forseti-process-exited"), 5, message="no exit event")
        recv.should_stop = True
        thread.join(5)
    (started,) = mine("forseti-process-started")
    (exited,) = mine("forseti-process-exited")
    assert started["child_pid"] == ref.pid and started["hostname"] == ref.node and started["name"] == "default"
    assert exited["reason"] == "stop" and exited["child_pid"] == ref.pid


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_new_leader_rebuilt_after_the_old_one_died_knows_the_init_args_of_the_keys_left(
    broker: str, request: pytest.FixtureRequest, tmp_path: os.PathLike[str],
) -> None:
    # Two workers of their own: the leader is killed, the other leads, rebuilt from its own report.
    url = request.getfixturevalue(f"{broker}_url")
    with harness(url, tmp_path, n=2, pool="solo") as h:

        def stats(host: str) -> dict[str, object]:
            return dict(((h.app.control.inspect([host], timeout=2).stats() or {}).get(host) or {}).get("forseti", {}))

        hosts = [w.hostname for w in h.cluster.workers]
        leader = wait_for(lambda: next((x for x in hosts if stats(x).get("leader")), None), 10, 0.1, "no leader")
        (other,) = (x for x in hosts if x != leader)
        refs = [h.forseti.get_key(fresh("args"), args=(i, {"n": i})) for i in range(6)]
        left = [r for r in refs if r.node == other]
        assert len(left) == 3, [r.node for r in refs]  # least used, so half on each worker
        table = stats(leader)["table"]
        assert isinstance(table, dict) and (table["keys"], table["with_args"]) == (6, 6), table
        h.cluster.worker(leader).kill()

        def rebuilt() -> dict[str, object] | None:
            table = stats(other).get("table")
            return table if isinstance(table, dict) and table["ready"] and table["keys"] == len(left) else None

        new = wait_for(rebuilt, 30, 0.2, lambda: f"no new leader\n{h.cluster.log_tails()}")
        assert new["with_args"] == len(left), "the new leader lost the init args of the keys left"
        for ref in left:
            ref.stop()
