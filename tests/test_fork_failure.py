"""A fork refused for lack of a resource (a pids cgroup at its limit) fails the new key only.

The worker and every process it has forked are moved into a cgroup v1 ``pids`` group of their
own; its ``pids.max`` is then set to ``pids.current``, so the next fork (or thread) anywhere in
the worker fails with ``EAGAIN``, as it would in a container at its process limit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forseti_celery import KeyRef, ResourceExhausted, StartError
from forseti_celery.testing import WorkerProcess, descendants_of, wait_for

from .chaos_support import join_group, pids_group
from .helpers import alive, fresh, harness

SPARES = 2  # the worker's forseti_spares when the zygote forks


@pytest.fixture
def pids_cgroup() -> Iterator[Path]:
    """A fresh cgroup v1 pids group; its processes are moved back to the root group at teardown."""
    with pids_group() as group:
        yield group


def _refused_refills(worker: WorkerProcess) -> int:
    return worker.log_text().count("could not fork a spare keyed process")


@pytest.mark.parametrize("forker", ["zygote", "exec-zygote", "worker"])
def test_a_fork_refused_at_the_pids_limit_fails_the_new_key_and_no_other(
    forker: str, broker_url: str, tmp_path: Path, pids_cgroup: Path
) -> None:
    spares = 0 if forker == "worker" else SPARES  # without spares there is no zygote: the worker forks
    with harness(broker_url, tmp_path, n=1, FORSETI_SPARES=str(spares),
                 FORSETI_ZYGOTE="exec" if forker == "exec-zygote" else "fork") as h:
        worker = h.cluster.workers[0]
        join_group(pids_cgroup, worker)
        refs = [h.forseti.get_key(fresh(f"pids-{i}")) for i in range(10)]
        for i, ref in enumerate(refs):
            for _ in range(i):
                ref.send("inc")
        assert [r.call("get") for r in refs] == list(range(10))
        # Every spare forked, then nothing more may start in the worker's group.
        wait_for(
            lambda: len(worker.descendants()) == 1 + len(refs) + (1 + spares if spares else 0),
            10.0,
            message=lambda: f"spares not forked: {worker.descendants()}",
        )
        (pids_cgroup / "pids.max").write_text((pids_cgroup / "pids.current").read_text())

        # The spares at hand take new keys without a fork; the first key after them needs one.
        refused = fresh("pids-refused")
        taken: list[KeyRef] = [h.forseti.get_key(fresh(f"pids-spare-{i}")) for i in range(spares)]
        t0 = time.monotonic()
        with pytest.raises(ResourceExhausted) as info:
            h.forseti.get_key(refused, timeout=10)
        refused_after = time.monotonic() - t0
        assert isinstance(info.value, StartError) and info.value.exc_type == "BlockingIOError"
        assert "init failed" not in str(info.value)
        failcnt = int((pids_cgroup / "pids.events").read_text().split()[1])

        # Every live key lives on, with its state; none was restarted.
        assert [r.call("get", timeout=5) for r in refs] == list(range(10))
        assert [r.call("get", timeout=5) for r in taken] == [0] * spares
        assert all(alive(r.pid) for r in [*refs, *taken])
        assert all(len(h.starts(r.key)) == 1 for r in [*refs, *taken])
        assert h.forseti.search_key(refused) is None

        if spares:
            # The refill of the spares taken is tried again while the limit holds, at longer and
            # longer intervals: more often than the two starts that cued it, and not in a loop.
            held = time.monotonic()
            wait_for(
                lambda: _refused_refills(worker) >= spares + 2,
                15.0,
                message=lambda: f"refill tried {_refused_refills(worker)} times:\n{worker.log_tail()}",
            )
            held = time.monotonic() - held
        (pids_cgroup / "pids.max").write_text("max")
        if spares:
            # The refill of the spares, refused meanwhile, is tried again (no start needed to cue it).
            zygote = next(pid for pid in worker.descendants() if refs[0].pid in descendants_of(pid))
            wait_for(
                lambda: len(descendants_of(zygote)) == len(refs) + 2 * spares,
                20.0,
                message=lambda: f"spares not refilled: {descendants_of(zygote)}",
            )
        t0 = time.monotonic()
        again = h.forseti.get_key(refused)
        started_after = time.monotonic() - t0
        assert again.call("get") == 0
        print(
            f"\n[{forker}] refused in {refused_after:.3f} s ({info.value}); pids refused {failcnt} times; "
            f"spare refills refused {_refused_refills(worker)} times"
            + (f" ({spares + 2} in {held:.2f} s)" if spares else "")
            + f"; key started {started_after:.3f} s after the limit was raised"
        )
        for r in [*refs, *taken, again]:
            r.stop()
