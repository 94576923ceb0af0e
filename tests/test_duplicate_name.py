"""Two workers started with one ``-n`` name: the second refuses to start, the first keeps its keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from forseti_celery.testing import WorkerProcess, wait_for

from .helpers import ROOT, fresh, harness


def test_a_second_worker_with_a_live_workers_name_refuses_to_start_and_the_first_keeps_its_keys(
    broker_url: str, tmp_path: Path
) -> None:
    with harness(broker_url, tmp_path, n=2, pool="solo") as h:
        first = h.cluster.workers[0]
        refs = [h.forseti.get_key(fresh("named")) for _ in range(6)]
        mine = [ref for ref in refs if ref.node == first.hostname]
        assert mine, "no key was placed on the first worker"
        for ref in mine:
            ref.send("inc")
            assert ref.call("get") == 1
        # The same name, the same namespace and broker; a log of its own.
        twin = WorkerProcess("tests.app", first.hostname, broker_url, tmp_path / "twin", pool="solo",
                             env=h.env, cwd=str(ROOT)).start()
        try:
            code = wait_for(lambda: twin.returncode, 30, 0.1, lambda: f"the twin kept running\n{twin.log_tail()}")
        finally:
            if twin.alive:
                twin.stop()
        text = twin.log_text()
        print(f"\n[duplicate] the twin exited with code {code}; its error: "
              f"{[line for line in text.splitlines() if 'refusing' in line]}")
        assert code != 0
        assert f"another worker named {first.hostname}" in text and "refusing to start" in text
        assert f"pid {first.pid}" in text
        for ref in mine:
            assert h.forseti.search_key(ref.key) == ref
            assert ref.call("get") == 1
            assert len(h.starts(ref.key)) == 1
        logs = "".join(w.log_text() for w in h.cluster.workers)
        assert f"worker {first.hostname} lost" not in logs
        assert f"{first.hostname} is silent" not in logs


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_a_worker_restarted_under_its_name_after_a_crash_starts_and_takes_keys(broker_url: str, tmp_path: Path) -> None:
    with harness(broker_url, tmp_path, n=2, pool="solo") as h:
        first = h.cluster.workers[0]
        ref = wait_for(lambda: next((r for r in (h.forseti.get_key(fresh("crash")) for _ in range(4))
                                     if r.node == first.hostname), None), 10, 0.1, "no key on the first worker")
        first.kill()
        first.restart()
        # Its old incarnation times out, and only then is its successor believed: keys go there again.
        wait_for(lambda: h.forseti.search_key(ref.key) is None, 20, 0.2, "the crashed worker's key was never freed")
        again = [h.forseti.get_key(fresh("after-crash")) for _ in range(6)]
        assert first.hostname in {r.node for r in again}
        assert all(r.call("key") == r.key for r in again)
