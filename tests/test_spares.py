"""Spares forked behind a new key (issue 15, the cold path): the next spare waits until the
worker is quiet while another is at hand, also when the zygote forks it (a fork, and the new
spare's first steps, take a core on the path of the call that usually follows a start); with
none at hand, every spare wanted comes from one request to the zygote."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from forseti_celery import KeyedProcess
from forseti_celery.child import runtime as child_main
from forseti_celery.core.conf import ChildConfig
from forseti_celery.worker.pool import spawner as spawner_mod
from forseti_celery.worker.pool import zygote as zygote_mod
from forseti_celery.worker.pool.reports import Reports
from forseti_celery.worker.pool.spawner import Spawner
from forseti_celery.worker.pool.table import Table

pytestmark = pytest.mark.skipif(not zygote_mod.available(), reason="the zygote needs Linux pidfds")


class Echo(KeyedProcess):
    def handle_call(self, msg: Any) -> Any:
        return msg


@pytest.fixture
def spawner() -> Iterator[Spawner]:
    """A worker's spawner with a live zygote (its thread not started: the test drives it)."""
    sp = Spawner(Table(), Reports("w", "leader", lambda batch: None, lambda: None), ChildConfig(spares=2),
                 child_main.Lifeline(fence_after=60.0, check_every=0.1), lambda name: Echo, lambda: None, [],
                 lambda box: None, threading.Event())
    assert sp.start_zygote() is not None
    try:
        yield sp
    finally:
        for c in sp._table.spares:
            _end(c)
        sp.stop_zygote()


def _end(c: Any) -> None:
    c.process.kill()
    c.process.join(5.0)
    c.process.close()
    c.conn.close()


def test_a_spare_is_forked_while_another_is_at_hand_only_once_the_worker_is_quiet(
    spawner: Spawner, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SimpleNamespace(monotonic=lambda: 100.0)
    monkeypatch.setattr(spawner_mod, "time", clock)
    assert spawner._fork_spare() is False  # none at hand: both forked at once
    _end(spawner._table.spares.popleft())  # a key took one: one is left
    spawner.busy_at = 100.0  # and the worker is busy with it (the call that follows, its answer)
    assert spawner.zygote is not None and spawner.zygote.alive
    assert spawner._refill_wait() == pytest.approx(spawner_mod._QUIET)
    clock.monotonic = lambda: 100.0 + spawner_mod._QUIET
    assert spawner._refill_wait() == 0.0
    spawner._table.spares.clear()  # none left: at once, busy or not
    clock.monotonic = lambda: 100.0
    assert spawner._refill_wait() == 0.0


def test_with_no_spare_at_hand_every_spare_wanted_comes_from_one_request_to_the_zygote(
    spawner: Spawner, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert spawner.zygote is not None
    asked: list[int] = []
    fork_many = spawner.zygote.fork_many

    def counted(n: int, timeout: float = 5.0) -> list[Any]:
        asked.append(n)
        return fork_many(n, timeout)

    monkeypatch.setattr(spawner.zygote, "fork_many", counted)
    assert spawner._fork_spare() is False  # nothing more wanted
    assert asked == [2] and len(spawner._table.spares) == 2
    assert len({c.pid for c in spawner._table.spares}) == 2
    _end(spawner._table.spares.popleft())  # a key took one
    assert spawner._fork_spare() is False
    assert asked == [2, 1] and len(spawner._table.spares) == 2
