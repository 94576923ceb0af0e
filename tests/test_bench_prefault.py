"""``make bench`` touches the memory new keys will take just before the rows that create them
(``benchmarks.common.prefault``): on a virtual machine whose host takes free memory back, a page not
touched lately costs 10-16 us on its first write, and a run after a quiet spell had its first
section (Redis) create keys at half the rate of the second (RabbitMQ). Figures in
``docs/benchmarks.rst`` ("Redis creating keys at half RabbitMQ's rate")."""

from __future__ import annotations

import mmap
import resource
from typing import Any

import pytest

from benchmarks import cluster
from benchmarks.cluster import ForsetiBench
from benchmarks.common import ForsetiRun, Sizes, Stat, prefault


class _Stop(Exception):
    pass


def test_prefault_writes_every_page_of_new_memory() -> None:
    mib = 8
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    per_page = prefault(mib)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before >= (mib << 20) // mmap.PAGESIZE
    assert per_page > 0
    assert prefault(0) == 0.0  # nothing to create (row 7a with its keys there already): no mapping


def _bench(monkeypatch: pytest.MonkeyPatch, order: list[str]) -> ForsetiBench:
    """A ForsetiBench without a cluster: every key it creates, and every prefault, goes to ``order``."""
    bench = object.__new__(ForsetiBench)
    bench.sizes = Sizes.pick(True, None)
    bench.run = ForsetiRun("redis", "redis://stub")
    bench.refs = []

    class Forseti:
        def get_key(self, key: str) -> Any:
            order.append("key")
            return type("Ref", (), {"key": key, "call": lambda self, msg: msg})()

    def touch(mib: int) -> float:
        order.append(f"prefault {mib}")
        return 1.0

    bench.forseti = Forseti()  # type: ignore[assignment]
    monkeypatch.setattr(cluster, "prefault", touch)
    monkeypatch.setattr(cluster, "mem_available_mib", lambda: 1e6)
    monkeypatch.setattr(ForsetiBench, "_warm_up", lambda self: None)
    return bench


def test_the_creation_rows_find_their_memory_touched_first(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    bench = _bench(monkeypatch, order)

    def stop(self: ForsetiBench) -> None:
        raise _Stop

    monkeypatch.setattr(ForsetiBench, "fresh_lookups", stop)  # the rows after 2b: not run here
    monkeypatch.setattr(cluster, "measure", lambda results, name, fn: fn())
    with pytest.raises(_Stop):
        bench.measure_all()
    s = bench.sizes
    keys = s.cold + 50 * (s.batches + s.thread_batches)
    assert order == [f"prefault {keys * cluster._MIB_PER_NEW_KEY}"] + ["key"] * keys
    assert "rows 1-2b: 630 MiB touched first, 1.0 us a page" in bench.run.notes


def test_creating_the_live_keys_finds_their_memory_touched_first(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    bench = _bench(monkeypatch, order)
    bench.sizes = Sizes.pick(True, 20)
    bench.run.results["uss"] = Stat([2.0])
    monkeypatch.setattr(ForsetiBench, "_check_count", lambda self: len(self.refs))
    bench.create_many()
    assert order == [f"prefault {20 * cluster._MIB_PER_NEW_KEY}"] + ["key"] * 20
