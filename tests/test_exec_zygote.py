"""A zygote started by exec (``forseti_zygote = "exec"``): a new interpreter that imports the
registered keyed processes by name, maps the worker's lifeline from a memfd and forks the spares
as a forked zygote does; the worker falls back to the forked zygote where it cannot be used."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import billiard.connection
import pytest

from forseti_celery import ConfigurationError, KeyedProcess
from forseti_celery.child import runtime as child_main
from forseti_celery.core import protocol as p
from forseti_celery.core.conf import ChildConfig, Settings
from forseti_celery.core.pipe import Assign
from forseti_celery.testing import descendants_of, wait_for
from forseti_celery.worker.pool import zygote as zygote_mod
from forseti_celery.worker.pool.fork import KeyedChild
from forseti_celery.worker.pool.reports import Reports
from forseti_celery.worker.pool.spawner import Spawner
from forseti_celery.worker.pool.table import Table

from .helpers import alive, fresh, harness

pytestmark = pytest.mark.skipif(not zygote_mod.available(), reason="the zygote needs Linux pidfds")


class Echo(KeyedProcess):
    def handle_call(self, msg: Any) -> Any:
        return msg


class Outer:
    class Inner(KeyedProcess):
        pass


def _execd(refs: dict[str, str], lifeline: child_main.Lifeline | None = None) -> zygote_mod.Zygote:
    return zygote_mod.Zygote(KeyedChild, ChildConfig(zygote="exec"),
                             lifeline or child_main.Lifeline(fence_after=60.0, check_every=0.1, mappable=True),
                             lambda name: None, [], refs=refs)


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_targets_are_named_for_a_new_interpreter_only_when_the_name_gives_the_same_object() -> None:
    assert zygote_mod.ref_of(Echo) == f"{__name__}:Echo"
    assert zygote_mod.ref_of(Outer.Inner) == f"{__name__}:Outer.Inner"

    def local(key: str) -> None: ...

    assert zygote_mod.ref_of(local) is None  # defined in a function
    main = type("Main", (KeyedProcess,), {"__module__": "__main__"})
    assert zygote_mod.ref_of(main) is None  # __main__ is another module in a new interpreter
    rebound = type("Echo", (KeyedProcess,), {"__module__": __name__})
    assert zygote_mod.ref_of(rebound) is None  # its name gives another object
    assert zygote_mod.ref_of(lambda key: None) is None
    assert zygote_mod.ref_of(object()) is None


def test_a_bad_forseti_zygote_is_a_configuration_error_naming_it() -> None:
    with pytest.raises(ConfigurationError, match="forseti_zygote must be one of 'fork', 'exec', not 'spawn'"):
        Settings.check(zygote="spawn")
    assert Settings.check(zygote="exec") is None
    assert ChildConfig.from_settings(Settings(zygote="exec")).zygote == "exec"


def test_the_exec_zygote_runs_a_spare_in_a_new_interpreter() -> None:
    zygote = _execd({"echo": f"{__name__}:Echo"})
    try:
        assert zygote.execd and zygote.serves("echo") and not zygote.serves("other")
        process, fd = zygote.fork()  # (once it answers, it has exec'd: its command line is set)
        assert "forseti_celery.worker.pool.zygote import boot" in _cmdline(zygote.process.pid)
        conn = billiard.connection.Connection(fd)
        conn.send_bytes(p.encode([Assign("echo", "k", [], None, 0, "s").to_wire()]))
        assert p.decode(conn.recv_bytes())[0]["t"] == "started"
        assert _ppid(process.pid) == zygote.process.pid
        process.kill()
        assert zygote.wait(process.pid, 5.0) == -signal.SIGKILL
        process.close()
        conn.close()
    finally:
        zygote.stop()


def test_an_exec_zygote_that_cannot_import_a_target_says_why_at_the_first_request() -> None:
    zygote = _execd({"echo": "tests.no_such_module_anywhere:Echo"})
    try:
        with pytest.raises(EOFError, match=r"could not start: ModuleNotFoundError: No module named 'tests\.no_such"):
            zygote.fork()
        assert not zygote.alive
        zygote.process.join(5.0)
        assert not alive(zygote.process.pid)
    finally:
        zygote.stop()


def test_an_exec_zygote_kills_its_spares_once_the_worker_is_cut_off() -> None:
    """The lifeline is a memfd the new interpreter maps: what the worker writes, its zygote reads."""
    lifeline = child_main.Lifeline(fence_after=60.0, check_every=0.1, mappable=True)
    zygote = _execd({"echo": f"{__name__}:Echo"}, lifeline)
    try:
        process, fd = zygote.fork()
        conn = billiard.connection.Connection(fd)
        conn.send_bytes(p.encode([Assign("echo", "k", [], None, 0, "s").to_wire()]))
        assert p.decode(conn.recv_bytes())[0]["t"] == "started"
        lifeline.heard(time.monotonic())
        assert zygote.wait(process.pid, 0.5) is None  # heard: lives on
        lifeline.heard(time.monotonic() - 120.0)  # as if the worker had not heard the broker for 2 minutes
        assert zygote.wait(process.pid, 5.0) == child_main.FENCED
        process.close()
        conn.close()
    finally:
        zygote.stop()


def _spawner(config: ChildConfig, target: Any) -> Spawner:
    lifeline = child_main.Lifeline(fence_after=60.0, check_every=0.1, mappable=True)
    return Spawner(Table(), Reports("w", "leader", lambda batch: None, lambda: None), config, lifeline,
                   lambda name: target, lambda: None, [], lambda box: None, threading.Event(), lambda: ["default"])


def test_a_target_not_importable_by_name_keeps_the_forked_zygote(caplog: pytest.LogCaptureFixture) -> None:
    class Local(KeyedProcess):
        pass

    sp = _spawner(ChildConfig(spares=2, zygote="exec"), Local)
    with caplog.at_level(logging.WARNING):
        zygote = sp.start_zygote()
    try:
        assert zygote is not None and not zygote.execd
        assert "cannot be imported by name" in caplog.text
    finally:
        sp.stop_zygote()
    sp = _spawner(ChildConfig(spares=2, zygote="exec"), Echo)
    zygote = sp.start_zygote()
    try:
        assert zygote is not None and zygote.execd and zygote.serves("default")
    finally:
        sp.stop_zygote()


def test_keyed_processes_of_an_exec_zygote_serve_keys_log_in_the_worker_and_die_with_it(
    broker_url: str, tmp_path: Path
) -> None:
    with harness(broker_url, tmp_path, n=1, FORSETI_ZYGOTE="exec") as h:
        worker = h.cluster.workers[0]
        refs = [h.forseti.get_key(fresh(f"exec-{i}")) for i in range(4)]  # spares, then forks on demand
        for ref in refs:
            ref.send("inc")
        assert [r.call("get") for r in refs] == [1] * 4
        zygotes = {_ppid(r.pid) for r in refs}
        assert len(zygotes) == 1
        (zygote,) = zygotes
        assert "forseti_celery.worker.pool.zygote import boot" in _cmdline(zygote)
        assert _ppid(zygote) == worker.pid
        # A crash is logged where the worker logs.
        refs[1].send("crash")
        wait_for(lambda: "cast crash" in worker.log_text(), 10.0, message=lambda: worker.log_tail())
        pids = [zygote, *descendants_of(zygote)]
        worker.kill(signal.SIGKILL)
        wait_for(lambda: not any(alive(pid) for pid in pids), 5.0,
                 message=lambda: f"outlived their worker: {[pid for pid in pids if alive(pid)]}")


def test_async_keyed_processes_run_from_an_exec_zygote(redis_url: str, tmp_path: Path) -> None:
    with harness(redis_url, tmp_path, n=1, app="tests.async_app", FORSETI_ZYGOTE="exec") as h:
        worker = h.cluster.workers[0]
        ref = h.forseti.get_key(fresh("exec-async"), name="async-ordered")
        assert ref.call(["c", 1, 0.01]) == 1
        assert ref.call("log") == [["in", "c", 1], ["out", "c", 1]]
        zygote = _ppid(ref.pid)
        assert zygote != worker.pid and "zygote import boot" in _cmdline(zygote)
        ref.stop()


def test_a_name_registered_after_the_exec_zygote_started_is_forked_by_the_worker() -> None:
    """The exec'd zygote imported the names registered when it started; a later one takes no
    spare of it, and its keyed process is a fork of the worker, which knows it."""
    sp = _spawner(ChildConfig(spares=2, zygote="exec"), Echo)  # registered: "default" only
    zygote = sp.start_zygote()
    late: list[Any] = []
    try:
        assert zygote is not None and zygote.execd and not zygote.serves("late")
        assert sp._fork_spare() is False  # both spares, from the exec'd zygote
        with sp._table.lock:
            assert len(sp._table.spares) == 2
            assert not sp.assign_spare("late", "k1", [], "s1", [])
            assert len(sp._table.spares) == 2  # (none taken)
        late.append(sp._fork_for(Echo, "late", "k1", [], "s1", []))
        assert isinstance(late[0].process, KeyedChild) and _ppid(late[0].pid) != zygote.process.pid
        with sp._table.lock:
            assert sp.assign_spare("default", "k2", [], "s2", [])
            late.append(sp._table.by_key[("default", "k2")])
        assert _ppid(late[1].pid) == zygote.process.pid
    finally:
        with sp._table.lock:
            left = [*late, *sp._table.spares]
        for c in left:
            c.process.kill()
            c.process.join(5.0)
            c.conn.close()
        sp.stop_zygote()
