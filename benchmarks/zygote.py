"""Rows 1e and 2e of ``make bench``: rows 1 and 2 again, on a cluster of their own whose workers
start their zygote by exec (``forseti_zygote = "exec"``, docs/configuration.rst), on the run's
broker, beside rows 1 and 2 of the forked zygote (the default) in the same run. The run's notes
give both kinds of zygote's memory: the exec'd one shares no page with its worker.

Run alone: ``python -m benchmarks.zygote [broker-url] [pairs]`` alternates the two kinds of cluster
(pairs of rows 1 and 2, with the machine's CPU time per new key from ``/proc/stat``).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from benchmarks.common import Sizes, log, measure, repeat_ms

if TYPE_CHECKING:
    from benchmarks.cluster import ForsetiBench

__all__ = ["measure_rows", "zygote_of"]


def zygote_of(pid: int, workers: set[int]) -> int | None:
    """The parent of keyed process ``pid`` when it is a zygote (not one of the ``workers``: a
    keyed process the worker forked itself)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            parent = int(fh.read().rsplit(")", 1)[1].split()[1])
    except OSError:  # ended meanwhile
        return None
    return None if parent in workers or parent == 1 else parent


def _rollup_mib(pid: int, field: str) -> float:
    """One figure of ``/proc/<pid>/smaps_rollup`` (``Rss``, ``Pss``), in MiB."""
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        return int(next(line for line in fh if line.startswith(f"{field}:")).split()[1]) / 1024


def _zygote_note(bench: ForsetiBench, label: str) -> str | None:
    workers = {w.pid for w in bench.cluster.workers}
    zygotes = {z for ref in bench.refs[:30] if (z := zygote_of(ref.pid, workers)) is not None}
    if not zygotes:
        return None
    try:
        rss = sorted(_rollup_mib(z, "Rss") for z in zygotes)
        pss = sorted(_rollup_mib(z, "Pss") for z in zygotes)
    except OSError:
        return None
    # PSS: each page shared with the worker or the keyed processes counted in shares (USS would hide
    # the exec'd zygote's pages its keyed processes share, RSS count the forked one's the worker has).
    return (f"{label}: {len(zygotes)} zygotes, resident {', '.join(f'{m:.1f}' for m in rss)} MiB, "
            f"proportional (PSS) {', '.join(f'{m:.1f}' for m in pss)}")


def _cold_and_batch(bench: ForsetiBench, cold: str, batch: str) -> float:
    """Rows 1 and 2 on ``bench`` into its results as ``cold`` and ``batch``: the machine's CPU
    time per new key meanwhile (ms)."""
    s, r = bench.sizes, bench.run.results
    bench._warm_up()
    bench._prefault("rows 1e-2e", s.cold + 50 * s.batches)
    cpu = _cpu_seconds()
    measure(r, cold, lambda: repeat_ms(bench._cold, s.cold))
    measure(r, batch, lambda: [bench._batch(f"b{i}", threads=0) for i in range(s.batches)])
    return (_cpu_seconds() - cpu) * 1000 / (s.cold + 50 * s.batches)


def measure_rows(bench: ForsetiBench) -> None:
    """Rows ``cold_exec`` and ``batch_exec`` into ``bench``'s results, on a new cluster."""
    from benchmarks.cluster import ForsetiBench

    note = _zygote_note(bench, "forked zygotes (rows 1-2)")
    if note:
        bench.run.notes.append(note)
    execd = ForsetiBench(bench.run.kind, bench.run.url, None, bench.sizes, signed=bench.run.signed, zygote="exec")
    with execd:
        execd.start(baselines=False)
        _cold_and_batch(execd, "cold", "batch")
        note = _zygote_note(execd, "zygotes started by exec (rows 1e-2e)")
    r = bench.run.results
    for mine, theirs in (("cold", "cold_exec"), ("batch", "batch_exec")):
        if mine in execd.run.results:
            r[theirs] = execd.run.results[mine]
    bench.run.notes.extend(n for n in [note, *(n for n in execd.run.notes if n.startswith("rows 1e"))] if n)


def _cpu_seconds() -> float:
    with open("/proc/stat") as fh:
        ticks = list(map(int, fh.readline().split()[1:]))
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str]) -> None:
    from benchmarks.cluster import ForsetiBench
    from benchmarks.common import Brokers

    brokers = Brokers()
    url = argv[0] if argv else brokers.url("redis")
    pairs = int(argv[1]) if len(argv) > 1 else 3
    assert url is not None
    kind = "redis" if url.startswith(("redis", "unix")) else "rabbitmq"
    sizes = Sizes.pick(quick=False, many=None)
    try:
        for i in range(pairs):
            for zygote in ("fork", "exec") if i % 2 == 0 else ("exec", "fork"):
                bench = ForsetiBench(kind, url, None, sizes, zygote=zygote)
                with bench:
                    bench.start(baselines=False)
                    cpu_ms = _cold_and_batch(bench, "cold", "batch")
                    note = _zygote_note(bench, "zygotes")
                res = bench.run.results
                cold, batch = (res[k].median if k in res and res[k].ok else float("nan") for k in ("cold", "batch"))
                print(f"{zygote:4s}  row 1 {cold:5.2f} ms  row 2 {batch:5.0f} keys/s  "
                      f"machine CPU {cpu_ms:5.2f} ms a key  ({note})", flush=True)
    finally:
        brokers.close()
    log("done")


if __name__ == "__main__":
    main(sys.argv[1:])
