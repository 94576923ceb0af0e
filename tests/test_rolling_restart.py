"""A rolling restart of every worker (issue 13), both brokers: 3 workers, each shut down warm in
turn and replaced (under its own name, then under new ones), while 4 client processes send
key-addressed messages to 60 movable keys that count them. Afterwards every key counts exactly
what its senders were acknowledged, no message was handled twice or lost, no two processes of
a key were ever seen alive at once, and the longest wait of a message per key is printed."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.handoff_support import Traffic, check_counts, pauses, state_cluster

KEYS = 60


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_rolling_restart_of_every_worker_loses_no_state_and_no_message_and_never_runs_a_key_twice(
        broker: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    with state_cluster(request.getfixturevalue(f"{broker}_url"), tmp_path, 3) as (h, monitor):
        keys = [f"roll-{i}-{uuid.uuid4().hex[:6]}" for i in range(KEYS)]
        for key in keys:  # created before the traffic: spread over the three workers
            h.forseti.get_key(key, name="tally", timeout=30)
        assert sorted(h.forseti.get_metrics(timeout=10).values()) == [20, 20, 20]
        first, *others = list(h.cluster.workers)
        with Traffic(h, keys) as traffic:
            # The first under its own name, the others replaced by workers of new names.
            assert first.stop(60) == 0, f"{first.hostname} did not leave by itself\n{first.log_tail()}"
            first.restart(ready_timeout=60)
            h.wait_members(3)
            for worker in others:
                assert worker.stop(60) == 0, f"{worker.hostname} did not leave by itself\n{worker.log_tail()}"
                h.cluster.add_worker()
                h.wait_members(3)
            acked = traffic.finish()
        assert not traffic.errors, traffic.errors
        states = check_counts(h, acked, keys)
        assert monitor.violations() == []
        worst, p99 = pauses(states)
        print(f"\n[rolling restart, {broker}] {sum(acked.values())} messages to {KEYS} keys, 0 lost, 0 twice; "
              f"longest wait per key: max {worst:.0f} ms, p99 {p99:.0f} ms")
