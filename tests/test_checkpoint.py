"""Checkpoints on real Redis (issue 13): the store's compare-and-set (claim, write, delete; a stale
incarnation refused), a SIGSTOPped keyed process resumed after its key started again, and keys of a
worker killed with SIGKILL coming back on another worker with their last checkpoint (both brokers)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import redis

from forseti_celery.core.pipe import Assign
from forseti_celery.core.state import Checkpoints
from forseti_celery.testing import wait_for
from forseti_celery.worker.pool import zygote as zygote_mod
from tests.helpers import Harness
from tests.test_state import Room, _answer, _call, _cast, _config, _exit_code, _read, _send, _spare
from tests.test_state import store as store  # the fixture: a store of a namespace of its own


def test_the_incarnation_that_claims_a_key_owns_it_and_every_older_one_is_refused(store: Checkpoints) -> None:
    assert store.claim("room", "k", (1, "a")) == (True, None)
    assert store.write("room", "k", (1, "a"), {"n": 1})
    assert store.claim("room", "k", (1, "b")) == (True, {"n": 1})  # restores from a's checkpoint
    assert not store.write("room", "k", (1, "a"), {"n": 99})  # a is stale: before b wrote anything
    assert not store.delete("room", "k", (1, "a"))
    assert store.write("room", "k", (1, "b"), {"n": 2})
    stored = store.read("room", "k")
    assert stored == {"state": {"n": 2}, "version": 4, "epoch": 1, "sid": "b"}


def test_a_spawn_of_an_older_leader_epoch_cannot_claim_a_key_a_newer_one_owns(store: Checkpoints) -> None:
    assert store.claim("room", "k", (5, "new"))[0]
    assert store.claim("room", "k", (4, "late")) == (False, None)
    assert store.write("room", "k", (5, "new"), [1])  # the owner is unchanged
    assert store.claim("room", "k", (0, "unknown-epoch"))[0]  # 0: a worker that gave no epoch


def test_the_version_only_grows_and_a_deleted_checkpoint_is_not_brought_back_by_a_stale_writer(
        store: Checkpoints) -> None:
    versions = []
    for sid in ("a", "b", "c"):
        store.claim("room", "k", (1, sid))
        store.write("room", "k", (1, sid), sid)
        versions.append(store.read("room", "k")["version"])  # type: ignore[index]
    assert versions == sorted(versions) and len(set(versions)) == 3
    assert store.delete("room", "k", (1, "c")) and store.read("room", "k") is None
    assert not store.write("room", "k", (1, "b"), "zombie") and store.read("room", "k") is None


def test_a_keys_of_two_names_and_a_key_with_any_text_never_share_a_checkpoint(store: Checkpoints) -> None:
    for name, key in (("a.b", "c"), ("a", "b.c"), ("room", "ключ \n\t\"x\""), ("room", "")):
        store.claim(name, key, (1, "s"))
        store.write(name, key, (1, "s"), [name, key])
    for name, key in (("a.b", "c"), ("a", "b.c"), ("room", "ключ \n\t\"x\""), ("room", "")):
        assert store.read(name, key)["state"] == [name, key]  # type: ignore[index]


def test_a_sigstopped_incarnation_resumed_after_its_key_started_again_has_its_checkpoint_refused(
        store: Checkpoints) -> None:
    old_pid, old = _spare(Room, _config(store), Assign("room", "r1", [], None, 1, "old"))
    try:
        _send(old, _cast("ann"), _call("checkpoint"))
        assert _answer(old) is True
        os.kill(old_pid, signal.SIGSTOP)  # partitioned, paused: its key starts again elsewhere
        new_pid, new = _spare(Room, _config(store), assign=Assign("room", "r1", [], None, 1, "new"))
        try:
            _send(new, _call("get"))
            assert _answer(new)["members"] == ["ann"]  # restored from the old one's checkpoint
            os.kill(old_pid, signal.SIGCONT)
            _send(old, _cast("stale"), _call("checkpoint", "c2"))
            assert _answer(old) is False  # refused: the new incarnation owns the key
            stored = store.read("room", "r1")
            assert stored is not None and stored["sid"] == "new" and stored["state"]["members"] == ["ann"]
            _send(new, {"t": "stop", "reason": "stop"})
            _read(new, "exit")
            assert _exit_code(new_pid) == 0
        finally:
            new.close()
        # Its own stop() does not delete what the new one left either (here: nothing, it stopped).
        _send(old, {"t": "stop", "reason": "stop"})
        _read(old, "exit")
        assert _exit_code(old_pid) == 0
    finally:
        if _alive(old_pid):
            os.kill(old_pid, signal.SIGCONT)
        old.close()


def _alive(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return False


def _elsewhere(h: Harness, key: str, gone: str) -> Any:
    """The key's live ref once it is on another worker than ``gone`` (get_key starts it there)."""
    def found() -> Any:
        try:
            ref = h.forseti.get_key(key, name="ledger", timeout=5)
            return ref if ref.node != gone else None
        except Exception:
            return None
    return wait_for(found, 30, 0.2, lambda: f"{key} never came back\n{h.cluster.log_tails()}")


def _on(h: Harness, hostname: str, first: int = 0) -> tuple[str, Any]:
    """A ledger key (and its ref) placed on the worker ``hostname``."""
    for i in range(first, first + 60):
        ref = h.forseti.get_key(f"acct-{i}", name="ledger", timeout=20)
        if ref.node == hostname:
            return f"acct-{i}", ref
    raise AssertionError(f"no key was placed on {hostname}")


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_the_keys_of_a_worker_killed_with_sigkill_come_back_elsewhere_with_their_last_checkpoint(
        broker: str, tmp_path: Path, redis_url: str, request: pytest.FixtureRequest) -> None:
    broker_url = request.getfixturevalue(f"{broker}_url")
    h = Harness(broker_url, tmp_path, n=2, app="tests.checkpoint_app", FORSETI_STATE_URL=redis_url)
    try:
        h.start()
        victim = h.cluster.workers[0]
        keys: dict[str, int] = {}
        for i in range(40):
            key = f"acct-{i}"
            ref = h.forseti.get_key(key, name="ledger", timeout=20)
            answer = ref.call({"add": i + 1}, timeout=10)
            assert answer == {"total": i + 1, "stored": True}
            # What happens after the last checkpoint is lost with the worker: at most that.
            ref.call({"add": 1000, "keep": False}, timeout=10)
            if ref.node == victim.hostname:
                keys[key] = i + 1
            if len(keys) >= 4:
                break
        assert keys, "no key was placed on the worker to kill"
        victim.kill(signal.SIGKILL)
        for key, total in keys.items():
            got = _elsewhere(h, key, victim.hostname).call("get", timeout=10)
            assert (got["total"], got["restored"]) == (total, True), key
    finally:
        h.stop()
        with redis.Redis.from_url(redis_url) as r:
            for name in r.scan_iter(f"{h.namespace}.state.*"):
                r.delete(name)


@pytest.mark.skipif(not zygote_mod.available(), reason="a keyed process the zygote forked watches no lifeline")
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_stopped_worker_s_process_resumed_after_its_key_came_back_elsewhere_has_its_checkpoint_refused(
        broker: str, tmp_path: Path, redis_url: str, request: pytest.FixtureRequest) -> None:
    # The whole worker is stopped (SIGSTOP: worker, zygote, keyed process) mid-handler, until its
    # key has started again on the other worker; then the keyed process alone resumes, with its
    # fence (the zygote) still stopped, and finishes its handler: its checkpoint is refused.
    h = Harness(request.getfixturevalue(f"{broker}_url"), tmp_path, n=2, app="tests.checkpoint_app",
                FORSETI_STATE_URL=redis_url)
    stopped: list[int] = []
    try:
        h.start()
        victim = h.cluster.workers[0]
        key, ref = _on(h, victim.hostname)
        assert ref.call({"add": 5}, timeout=10) == {"total": 5, "stored": True}
        ref.send({"add": 7, "nap": 1.0})
        wait_for(lambda: [e for e in h.journal() if e["ev"] == "napping"], 10, 0.01, "never handled")
        stopped = [victim.pid, *victim.descendants()]
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        again = _elsewhere(h, key, victim.hostname)
        assert again.call("get", timeout=10)["total"] == 5  # restored from the last checkpoint
        os.kill(ref.pid, signal.SIGCONT)  # the stale process alone
        (done,) = wait_for(lambda: [e for e in h.journal() if e["ev"] == "checkpoint"], 10, 0.02,
                           "the stale process never finished its handler")
        assert (done["pid"], done["stored"], done["total"]) == (ref.pid, False, 12)
        stored = Checkpoints(redis_url, h.namespace).read("ledger", key)
        assert stored is not None and stored["state"] == {"total": 5}
    finally:
        for pid in stopped:  # the worker, its pool, its zygote and its keyed processes
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        h.stop()
        with redis.Redis.from_url(redis_url) as r:
            for name in r.scan_iter(f"{h.namespace}.state.*"):
                r.delete(name)
