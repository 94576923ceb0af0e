"""The watcher's answers to callers, batched across keyed processes (issue 15).

What several keyed processes write in one watcher round goes out as one broker message per reply
queue, each process's answers in the order it wrote them, and what they write while the round
reads the others joins it. One process's huge answer goes in a broker message of its own, and a
malformed one (or a garbled pipe) costs its neighbours nothing. A real :class:`Watcher` reads real
pipes here; the keyed processes are stand-ins writing what ``child.runtime`` writes; messages are
counted, nothing is timed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from forseti_celery.core import protocol as p
from forseti_celery.core.codec import encode_message
from forseti_celery.core.messages import Reply
from forseti_celery.worker.pool import reports as reports_mod
from forseti_celery.worker.pool.idle import Idle
from forseti_celery.worker.pool.outbox import HEADER, Outbox
from forseti_celery.worker.pool.reports import Reports
from forseti_celery.worker.pool.table import Child, Table
from forseti_celery.worker.pool.watcher import Waker, Watcher

Published = list[list[tuple[str, list[dict[str, Any]]]]]


class _Process:
    """A keyed process's stand-in: a pid, a sentinel that never fires, a kill that is recorded."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._r, self._w = os.pipe()
        self.sentinel = self._r
        self.exitcode: int | None = None
        self.killed = False

    def kill(self) -> None:
        self.killed = True


class _Conn:
    def close(self) -> None:
        pass


class _Pool:
    """A watcher over ``n`` stand-in processes; :meth:`write` writes as process ``i`` would."""

    def __init__(self, n: int) -> None:
        self.published: Published = []
        self.table = Table()
        self.reports = Reports("w@host", "leader", self.published.append, lambda: None)
        self.watcher = Watcher(self.table, self.reports, Waker(), lambda: None, lambda *a, **k: None,
                               lambda *a, **k: None, False, threading.Event(), Idle(self.table, lambda name: None, 1.0))
        self.children: list[Child] = []
        self._ends: list[int] = []
        for i in range(n):
            r, w = os.pipe()
            _, to_w = os.pipe()
            box = Outbox(to_w, 1 << 20, lambda box: None)
            c = Child("default", f"k{i}", "sid", _Process(1000 + i), _Conn(), r, box, started=True)
            self.children.append(c)
            self._ends.append(w)
            self.table.by_key[("default", c.key)] = c
        self.table.new = list(self.children)
        self.watcher._watch_new()

    def write(self, i: int, frame: bytes) -> None:
        os.write(self._ends[i], frame)

    def call(self, i: int, corr: str, reply_to: str = "caller") -> None:
        """Process ``i`` has call ``corr`` to answer, as the node's delivery records it."""
        self.children[i].calls[corr] = reply_to
        self.reports.in_flight.taken += 1

    def round(self) -> None:
        self.watcher._watch_once()


def _frame(*lines: bytes) -> bytes:
    body = b"\n".join(lines)
    return HEADER.pack(len(body)) + body


def _reply(to: str, corr: str, value: Any) -> bytes:
    """An answer as a keyed process writes it (``Runtime.reply``)."""
    return bytes(encode_message(Reply(corr, reply_to=to).to_wire(), "reply", 1 << 30, payload=value).data)


def _answers(published: Published) -> dict[str, list[tuple[str, Any]]]:
    """Reply queue -> (correlation id, value) of each answer, in the order published."""
    out: dict[str, list[tuple[str, Any]]] = {}
    for batches in published:
        for rk, msgs in batches:
            for m in p.decode(p.encode(msgs)):
                out.setdefault(rk, []).append((m["c"], p.payload(m)))
    return out


@pytest.fixture
def pool() -> Iterator[_Pool]:
    pool = _Pool(6)
    yield pool


def test_answers_of_many_processes_in_one_round_go_as_one_broker_message_per_reply_queue(pool: _Pool) -> None:
    for i in range(6):  # each writes three answers, two callers' interleaved, in one frame or three
        lines = [_reply("caller-a", f"a{i}.0", i), _reply("caller-b", f"b{i}.0", i), _reply("caller-a", f"a{i}.1", i)]
        for frame in ([_frame(*lines)] if i % 2 else [_frame(line) for line in lines]):
            pool.write(i, frame)
    pool.round()
    assert len(pool.published) == 1  # one publish_many
    assert sorted(rk for rk, _ in pool.published[0]) == ["caller-a", "caller-b"]  # 18 answers, 2 broker messages
    got = _answers(pool.published)
    assert sorted(got["caller-a"]) == sorted([(f"a{i}.{j}", i) for i in range(6) for j in (0, 1)])
    assert sorted(got["caller-b"]) == sorted([(f"b{i}.0", i) for i in range(6)])
    for i in range(6):  # each process's answers to a caller in the order it wrote them
        assert [c for c, _ in got["caller-a"] if c.startswith(f"a{i}.")] == [f"a{i}.0", f"a{i}.1"]


def test_what_a_process_writes_while_the_round_reads_the_others_joins_it(pool: _Pool,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    reply = pool.reports.reply
    late = iter(range(1, 6))

    def reply_and_the_next_one_answers(to: str, msg: dict[str, Any]) -> None:
        reply(to, msg)
        i = next(late, None)  # as this answer is taken, the next process answers
        if i is not None:
            pool.write(i, _frame(_reply("caller", f"c{i}", i)))

    monkeypatch.setattr(pool.reports, "reply", reply_and_the_next_one_answers)
    for i in range(6):
        pool.call(i, f"c{i}")
    pool.write(0, _frame(_reply("caller", "c0", 0)))
    pool.round()
    # The first answer and the four written while the round went on (it asks again 4 times at most).
    assert [[(rk, len(msgs)) for rk, msgs in batches] for batches in pool.published] == [[("caller", 5)]]
    pool.round()
    assert [c for c, _ in _answers(pool.published)["caller"]] == ["c0", "c1", "c2", "c3", "c4", "c5"]

    assert not pool.reports.in_flight.waiting


class _Polls:
    """The watcher's poller, its polls counted."""

    def __init__(self, poller: Any) -> None:
        self._poller = poller
        self.polls = 0

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        self.polls += 1
        return list(self._poller.poll(timeout))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)


def test_the_last_answer_waited_for_is_published_without_looking_again(pool: _Pool) -> None:
    # A poll that finds nothing is a system call on the answer's way: looked again only while other
    # calls wait for their answers.
    polls = pool.watcher._poller = _Polls(pool.watcher._poller)  # type: ignore[assignment]
    pool.call(0, "c0")
    pool.call(1, "c1")
    pool.write(0, _frame(_reply("caller", "c0", 0)))
    pool.round()
    assert polls.polls == 2, "an answer with another call waiting did not look again"
    pool.write(1, _frame(_reply("caller", "c1", 1)))
    pool.round()
    assert polls.polls == 3, "the last answer waited for looked again before it was published"
    assert [c for c, _ in _answers(pool.published)["caller"]] == ["c0", "c1"] and len(pool.published) == 2
    assert not pool.reports.in_flight.waiting


def test_a_huge_answer_goes_on_its_own_and_a_malformed_one_costs_its_neighbours_nothing(
        pool: _Pool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reports_mod, "_BODY", 1000)  # (a pipe holds 64 KiB: a huge answer here is 2 kB)
    huge = "x" * 2000
    pool.write(0, _frame(_reply("caller", "small0", 0)))
    pool.write(1, _frame(_reply("caller", "huge", huge), _reply("caller", "after-huge", 1)))
    pool.write(2, _frame(b'{"t":"reply","r":"caller"}', b'{"t":"reply","r":"caller","c":["x"]}', b"{not json",
                         _reply("caller", "after-malformed", 2)))  # no id, an id of no type, no JSON
    pool.write(3, _frame(_reply("x" * 256, "to-nowhere", 3), _reply("caller", "after-unroutable", 3)))
    pool.write(4, HEADER.pack(-5) + _reply("caller", "garbled", 4))  # no frame billiard writes
    pool.write(5, _frame(_reply("caller", "small5", 5)))
    with caplog.at_level("WARNING"):
        pool.round()
    got = [c for c, _ in _answers(pool.published)["caller"]]
    assert sorted(got) == sorted(["small0", "huge", "after-huge", "after-malformed", "after-unroutable", "small5"])
    assert got.index("huge") < got.index("after-huge")
    sizes = [len(msgs) for batches in pool.published for rk, msgs in batches]
    assert len(pool.published) == 1 and len(sizes) == 3  # before the huge one, it alone, after it
    assert [m["c"] for m in pool.published[0][1][1]] == ["huge"]
    assert pool.children[4].process.killed and pool.children[4].conn_fd not in pool.watcher._by_fd
    assert not any(c.process.killed for i, c in enumerate(pool.children) if i != 4)
    assert "malformed frame" in caplog.text and "no queue has that name" in caplog.text
