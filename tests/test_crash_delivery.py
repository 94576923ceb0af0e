"""Key-addressed messages still in a crashed process's worker-side mailbox (never written to its
pipe) reach its key's next incarnation, in order, none twice (issue 12); both brokers."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forseti_celery.core import protocol as p
from forseti_celery.core.messages import Reply
from tests.helpers import Harness, alive, fresh, harness
from tests.test_passivation import sender

_PAD = "x" * 10_000  # bytes per message: 250 of them are ten times what a child's socket buffers hold
_N = 250
_CALLS = {60, 130, 200, 249}  # sent as key-addressed calls, the rest as casts
_PIPE_AT_MOST = 1 << 20  # bytes a child's end of its pipe (an AF_UNIX socket pair) can hold, generously


@contextlib.contextmanager
def recording(broker_url: str, tmp: Path) -> Iterator[Harness]:
    """Two workers of ``tests.crash_app`` and a client."""
    with harness(broker_url, tmp, n=2, app="tests.crash_app") as h:
        yield h


@pytest.fixture(params=["redis", "rabbitmq"])
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    with recording(request.getfixturevalue(f"{request.param}_url"), tmp_path) as cluster:
        yield cluster


def _handled(h: Harness, key: str) -> list[dict[str, Any]]:
    return [e for e in h.journal() if e["key"] == key and e["ev"] == "handled"]


def test_key_addressed_messages_a_killed_process_never_took_are_handled_by_the_next_incarnation_in_order(
    h: Harness,
) -> None:
    key = fresh("untaken")
    ref = h.forseti.get_key(key, name="recording")
    # A probe key on the same worker: its answer, sent after the flood on the same connection,
    # says the worker has put the whole flood in the mailbox (its queue is consumed in order).
    probe = h.forseti.get_key(fresh("probe"), name="recording")
    while probe.node != ref.node:
        probe = h.forseti.get_key(fresh("probe"), name="recording")
    assert ref.call("seen")["seen"] == []
    os.kill(ref.pid, signal.SIGSTOP)  # takes nothing more off its pipe: the rest waits in its worker
    try:
        with sender(h) as s:
            calls = {}
            for i in range(_N):
                msg = {"i": i, "pad": _PAD}
                if i in _CALLS:
                    calls[s.send(ref, [], call=msg)] = i
                else:
                    s.send(ref, [msg])
            probed = s.send(probe, [], call="seen")
            s.receive(lambda got: any(m.get("c") == probed for m in got), timeout=60)
            os.kill(ref.pid, signal.SIGKILL)
            last = s.send(ref, [], call={"i": _N})  # to the dead pid: behind all the others
            heard = s.receive(lambda got: all(any(m.get("c") == c for m in got) for c in [*calls, last]),
                              timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(ref.pid, signal.SIGKILL)
    answers = {m["c"]: Reply.from_wire(m) for m in heard if m.get("c") in (*calls, last)}
    final = answers[last]
    assert final.error is None, final
    value = p.payload({p.PAYLOAD: final.payload})
    seen, pid = value["seen"], value["pid"]
    assert pid != ref.pid and not alive(ref.pid)
    # What it handled is what followed the part in its pipe when it died, in order, none twice.
    lost = seen[0] if seen[:-1] else _N
    assert seen == list(range(lost, _N + 1)), seen
    assert lost * len(_PAD) <= _PIPE_AT_MOST, f"{lost} messages lost: more than its pipe holds"
    assert [e["i"] for e in _handled(h, key)] == seen  # nowhere else, by no one else
    assert all(e["pid"] == pid for e in _handled(h, key))
    for corr, i in calls.items():  # a call it had taken is answered crash, the others by the next one
        if i < lost:
            assert answers[corr].error == "crash", answers[corr]
        else:
            assert answers[corr].error is None and p.payload({p.PAYLOAD: answers[corr].payload})["pid"] == pid
