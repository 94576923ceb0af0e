"""Mailboxes: a keyed process that stops taking its messages, or stops halfway through writing
one, costs the other keys of its worker nothing (real workers, both brokers)."""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from forseti_celery import ConfigurationError, KeyRef, MailboxFull
from forseti_celery.core import protocol as p
from forseti_celery.core.conf import ChildConfig, Settings
from forseti_celery.testing import wait_for

from .helpers import Harness, fresh, harness, pool_with_answers, seen_once_continued

#: forseti_mailbox_limit of these workers: small, so a few sends fill it.
MAILBOX = 1024 * 1024
PAD = "x" * 100_000
#: A call larger than any send: refused once a send has been (nothing drains a stopped process).
BIG = ["get", PAD * 2]
#: Longer than the workers' fence_after (forseti_node_timeout 4 - 2 heartbeats of 0.5 = 3 s).
STUCK_FOR = 5.0


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@contextmanager
def _stopped(pid: int) -> Iterator[None]:
    """``pid`` stopped (SIGSTOP) for the block, continued (SIGCONT) after it whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: _state(pid) == "T", 5, 0.01, f"pid {pid} never stopped")
        yield
    finally:
        _continue(pid)


def _continue(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:  # killed meanwhile: the test fails on what it saw first
        pass


def _neighbours(h: Harness, n: int = 20) -> dict[KeyRef, int]:
    """``n`` keys, each sent a few casts: ref -> the state its process must answer."""
    refs = {h.forseti.get_key(fresh(f"nb{i}")): i % 3 + 1 for i in range(n)}
    for ref, incs in refs.items():
        for _ in range(incs):
            ref.send("inc")
    for ref, value in refs.items():
        assert ref.call("get") == value
    return refs


def _ask_all(refs: dict[KeyRef, int], latencies: list[float]) -> None:
    """Every neighbour answers with its state (times in ``latencies``)."""
    for ref, value in refs.items():
        t0 = time.perf_counter()
        assert ref.call("get", timeout=5) == value, ref
        latencies.append(time.perf_counter() - t0)


def _log_size(h: Harness) -> int:
    return len(h.cluster.workers[0].log_text())


def _assert_never_fenced(h: Harness, since: int) -> None:
    """Since the worker's log was ``since`` characters long (a stall at its start is not ours)."""
    log = h.cluster.workers[0].log_text()[since:]
    assert "did not run for" not in log, h.cluster.log_tails()
    assert "has not heard the broker" not in log, h.cluster.log_tails()


def test_a_stopped_process_sent_megabytes_holds_up_no_other_key_and_gets_what_its_mailbox_took_in_order(
    broker_url: str, tmp_path: Path
) -> None:
    with harness(broker_url, tmp_path, n=1, FORSETI_MAILBOX_LIMIT=str(MAILBOX)) as h:
        stuck = h.forseti.get_key(fresh("stuck"), name="recorder")
        neighbours = _neighbours(h)
        node, pid = stuck
        assert {ref.node for ref in neighbours} == {node}
        latencies: list[float] = []
        rounds = sent = 0
        since = _log_size(h)
        with _stopped(pid):
            for _ in range(40):  # 4 MB: the mailbox and the pipe take about 1.3 MB of it
                stuck.send([sent, PAD])
                sent += 1
            with pytest.raises(MailboxFull, match="forseti_mailbox_limit"):
                stuck.call(BIG, timeout=5)
            deadline = time.monotonic() + STUCK_FOR
            while time.monotonic() < deadline:  # past the time the worker would fence itself
                _ask_all(neighbours, latencies)
                stuck.send([sent, PAD])
                sent += 1
                rounds += 1
        _assert_never_fenced(h, since)
        assert "casts to it dropped" in h.cluster.workers[0].log_text()

        got = seen_once_continued(stuck)
        # What its mailbox took, in order: the first sends (the later ones refused, but for
        # those still on their way once it was continued), never one twice.
        assert got == sorted(set(got)), got
        taken = next(i for i, m in enumerate([*got, None]) if m != i)
        assert MAILBOX // len(PAD) <= taken < 40 < sent, got
        stuck.send("after")
        assert stuck.call("seen")[-1] == "after"
        _ask_all(neighbours, latencies)
        print(f"\n{broker_url.split(':')[0]}: {sent} sends of {len(PAD) // 1000} kB to a stopped process, "
              f"{taken} taken while stopped; {rounds} rounds of 20 neighbour calls meanwhile, median "
              f"{statistics.median(latencies) * 1000:.2f} ms, max {max(latencies) * 1000:.1f} ms")


def test_a_process_stopped_halfway_through_writing_a_frame_holds_up_no_other_answer(
    broker_url: str, tmp_path: Path
) -> None:
    with harness(broker_url, tmp_path, n=1) as h:
        half = h.forseti.get_key(fresh("half"), name="halfway")
        neighbours = _neighbours(h)
        node, pid = half
        assert {ref.node for ref in neighbours} == {node}
        answer: list[Any] = []
        since = _log_size(h)
        caller = threading.Thread(target=lambda: answer.append(half.call("halfway", timeout=30)), daemon=True)
        caller.start()
        try:
            wait_for(lambda: _state(pid) == "T", 10, 0.01, "the process never stopped itself halfway")
            latencies: list[float] = []
            deadline = time.monotonic() + STUCK_FOR
            while time.monotonic() < deadline:
                _ask_all(neighbours, latencies)
        finally:
            _continue(pid)
        caller.join(10)
        assert answer == ["done"]  # the rest of its frame, then its answer, once continued
        assert half.call("get") == 0
        _assert_never_fenced(h, since)
        print(f"\n{broker_url.split(':')[0]}: {len(latencies)} neighbour calls while a frame was half "
              f"written, median {statistics.median(latencies) * 1000:.2f} ms")


def test_one_batch_of_many_sends_is_cut_at_the_limit_even_into_an_empty_mailbox() -> None:
    # A worker's Children with a real forked keyed process and pipe: a client batches up to 500
    # messages in one broker message, all of one key delivered at once; "any one message when
    # the mailbox is empty" must not let a whole batch in.
    from tests.app import Recorder  # here: importing the workers' app makes it the current one
    config = ChildConfig(fence_after=3600.0, spares=0, mailbox_limit=MAILBOX)
    children, answers = pool_with_answers("mbx@test", Recorder, config)
    children.start()
    try:
        children.spawn("recorder", "k", [], "sid", [["reply", "started"]])
        assert answers.get(timeout=10)["c"] == "started"
        (c,) = children.snapshot()

        def call(corr: str, msg: Any = "seen") -> dict[str, Any]:
            children.deliver({("recorder", "k"): [{"t": "call", "n": "recorder", "k": "k", "m": msg,
                                                    "r": "reply", "c": corr}]})
            answer = answers.get(timeout=10)
            assert answer["c"] == corr
            return answer

        with _stopped(c.pid):
            children.deliver({("recorder", "k"): [{"t": "cast", "m": [i, PAD]} for i in range(40)]})
            assert c.outbox.unsent_bytes <= MAILBOX
            assert call("while-stopped", BIG)["error"] == "mailbox_full"
        # The answer's value comes as the keyed process encoded it (the worker never decodes it).
        seen = wait_for(lambda: p.payload(call("seen")), 10, 0.05, "never answered once continued")
        assert MAILBOX // len(PAD) <= len(seen) < 40
        assert seen == list(range(len(seen)))  # the first sends of the batch, in order
    finally:
        children.stop_all("test", 1.0)
        children.stop()


def test_forseti_mailbox_limit_is_a_positive_number_of_bytes() -> None:
    assert Settings.from_app({}).mailbox_limit == 16 * 1024 * 1024
    assert Settings.from_app({"forseti_mailbox_limit": 1}).mailbox_limit == 1
    for bad in (0, -1, 1.5, "16M", True):
        with pytest.raises(ConfigurationError, match="forseti_mailbox_limit"):
            Settings.from_app({"forseti_mailbox_limit": bad})
