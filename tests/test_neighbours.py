"""Chaos: a misbehaving neighbour. One key of a worker is stopped, flooded, sent poison or huge
messages, forged messages arrive, a fork fails next to them: the 20 other keys of that worker keep
answering with their state, keep their process, and the worker never fences itself.

One cluster per broker for every scenario: ``w1`` leads and holds no key (``forseti_nodes``), ``w2``
holds the misbehaving key and its 20 neighbours, so a forged message about ``w2`` reaches a leader
that could act on it. A :class:`~tests.chaos_support.Monitor` watches every keyed process for two
of one key alive at once. See docs/failure-model.rst, "Isolation".
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from kombu import Producer

from forseti_celery import Forseti, InvalidMessage, KeyRef, MailboxFull, ResourceExhausted
from forseti_celery.core import protocol as p
from forseti_celery.core.conf import Settings
from forseti_celery.testing import WorkerProcess, wait_for

from .chaos_support import (
    Monitor,
    Neighbours,
    chaos,
    forge,
    forged_bye,
    forged_exit,
    forged_heartbeat,
    forged_spawn,
    forged_start,
    join_group,
    pids_group,
    report,
    wait_one_leader,
)
from .helpers import Harness, client_app, fresh, seen_once_continued
from .test_messages import UNSENDABLE

pytestmark = pytest.mark.chaos

#: forseti_mailbox_limit (the default): a stopped key's mailbox is full after 42 sends of PAD.
MAILBOX = Settings.mailbox_limit
PAD = "x" * 400_000
#: forseti_max_message_size (the default).
LIMIT = Settings.max_message_size
#: Longer than the workers' fence_after (forseti_node_timeout 4 - 2 heartbeats of 0.5 = 3 s).
STUCK_FOR = 4.0
#: What would tell that the worker fenced itself, stalled, or was given up by the leader.
FENCED = ("did not run for", "has not heard the broker")


@dataclass
class Street:
    """The cluster of every scenario: ``host`` holds ``neighbours`` (ref -> its state)."""

    h: Harness
    monitor: Monitor
    leader: str
    host: str
    neighbours: dict[KeyRef, int]
    asking: Forseti  #: the neighbours' own client

    @property
    def worker(self) -> WorkerProcess:
        return self.h.cluster.worker(self.host)


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def street(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Street]:
    url = request.getfixturevalue(f"{request.param}_url")
    with chaos(url, tmp_path_factory.mktemp(request.param), n=1, start=False) as (h, monitor):
        leader = h.cluster.workers[0].hostname
        host = leader.replace("w1-", "w2-", 1)
        for env in (h.env, h.cluster.env, h.cluster.workers[0].env):
            env["FORSETI_NODES"] = host
        h.cluster.start()
        assert wait_one_leader(h, [leader]) == leader
        h.cluster.add_worker(host)
        h.wait_members(1)
        neighbours = {h.forseti.get_key(f"nb-{i}"): i % 3 + 1 for i in range(20)}
        for ref, value in neighbours.items():
            for _ in range(value):
                ref.send("inc")
        assert {ref.node for ref in neighbours} == {host}
        assert all(ref.call("get") == value for ref, value in neighbours.items())
        asking = Forseti.of(client_app(url, h.namespace))
        asking.app.conf.forseti_cache = False
        try:
            yield Street(h, monitor, leader, host, neighbours, asking)
        finally:
            asking.close()


@contextmanager
def misbehaving(street: Street, what: str, timeout: float = 10.0) -> Iterator[Neighbours]:
    """Ask the neighbours all along the block, and after it: every one answers with its state from
    its first process, and nothing fences, stalls or frees ``street.host``."""
    logs = {w.hostname: len(w.log_text()) for w in street.h.cluster.workers}
    asker = Neighbours(street.asking, street.neighbours, timeout)
    asker.start()
    t0 = time.monotonic()
    try:
        asker.wait_rounds(1)
        before = asker.rounds
        yield asker
        during = asker.rounds - before
        asker.wait_rounds(1)
    finally:
        asker.stop()
    took = time.monotonic() - t0
    assert not asker.failures, f"{len(asker.failures)} neighbour answers went wrong: {asker.failures[:5]}"
    asker.ask_all()  # once more, when nothing else runs
    assert not asker.failures, asker.failures[:5]
    for worker in street.h.cluster.workers:
        log = worker.log_text()[logs[worker.hostname]:]
        for line in (*FENCED, f"worker {street.host} lost"):
            assert line not in log, f"{worker.hostname}: {line!r}\n{street.h.cluster.log_tails()}"
    for ref in street.neighbours:
        assert [life.pid for life in street.monitor.of_key(ref.key)] == [ref.pid], f"{ref.key!r} was restarted"
    assert not street.monitor.violations()
    report(f"{what} ({street.h.cluster.broker_url.split(':')[0]})", seconds=took, rounds_during=during,
           neighbour_calls=len(asker.latencies), median_ms=statistics.median(asker.latencies) * 1000,
           max_ms=max(asker.latencies) * 1000)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_neighbours_answer_while_one_key_is_stopped_and_sent_past_its_mailbox_limit(street: Street) -> None:
    stuck = street.h.forseti.get_key(fresh("stuck"), name="recorder")
    assert stuck.node == street.host
    sent = 0
    with misbehaving(street, "stopped key sent past its mailbox"):
        os.kill(stuck.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: _state(stuck.pid) == "T", 5, 0.01, "the key's process never stopped")
            deadline = time.monotonic() + STUCK_FOR
            while sent < 60 or time.monotonic() < deadline:  # 24 MB, and past fence_after
                stuck.send([sent, PAD])
                sent += 1
                if sent % 10 == 0:
                    time.sleep(0.1)  # a stream, not one burst
            with pytest.raises(MailboxFull, match="forseti_mailbox_limit"):
                stuck.call(["get", PAD * 2], timeout=5)
        finally:
            os.kill(stuck.pid, signal.SIGCONT)

        got = seen_once_continued(stuck)
    # What its mailbox took, in order, and the rest dropped (logged).
    assert got == list(range(len(got))) and MAILBOX // len(PAD) <= len(got) < sent, got
    assert "casts to it dropped" in street.worker.log_text()
    assert street.h.forseti.get_key(stuck.key, name="recorder") == stuck
    stuck.stop()


def test_neighbours_answer_while_one_key_is_flooded_with_ten_thousand_casts(street: Street) -> None:
    flooded = street.h.forseti.get_key(fresh("flooded"))
    assert flooded.node == street.host
    with misbehaving(street, "10,000 casts to one key"):
        t0 = time.monotonic()
        for _ in range(10_000):
            flooded.send("inc")
        sending = time.monotonic() - t0
        assert flooded.call("get", timeout=60) == 10_000
        handled = time.monotonic() - t0
    report("flood", sending=sending, handled=handled)
    assert street.h.forseti.get_key(flooded.key) == flooded
    flooded.stop()


def test_neighbours_answer_while_one_key_is_sent_poison(street: Street) -> None:
    target = street.h.forseti.get_key(fresh("poison"))
    assert target.node == street.host
    sent = 0
    with misbehaving(street, "poison"):
        for value, reason in UNSENDABLE.values():
            for _ in range(20):
                target.send(sent)
                sent += 1
            for how in (target.send, target.call):
                with pytest.raises(InvalidMessage, match=reason):
                    how(value)
        # Straight onto the worker's queue, past every client check: one batch, poison amid casts.
        casts = [p.encode_message({"n": target.name, "k": target.key, "p": target.pid, "t": p.CAST, "m": sent + i},
                                  "message", LIMIT) for i in range(200)]
        poison = [p.Encoded(b) for b in (b"{not json", b'{"t":"cast","m":' + b"[" * 978 + b"]" * 978 + b"}",
                                         b"42", b'{"t":"cast","n":"default"}', b'"\xff"')]
        with street.h.app.connection_for_write() as conn:
            Producer(conn.default_channel).publish(
                p.encode([*casts[:100], *poison, *casts[100:]]), exchange=street.h.forseti.names.exchange,
                routing_key=street.h.forseti.names.node_routing_key(street.host),
                content_type=p.CONTENT_TYPE, content_encoding=p.CONTENT_ENCODING)
        sent += len(casts)
        assert target.call("seen", timeout=10) == list(range(sent))
    assert street.h.forseti.get_key(target.key) == target
    target.stop()


def test_neighbours_answer_while_one_key_is_sent_a_stream_of_messages_just_under_the_size_limit(
    street: Street
) -> None:
    big = street.h.forseti.get_key(fresh("huge"), name="recorder")
    assert big.node == street.host
    payload = [0] * ((LIMIT - 256) // 2)  # a list of zeros: the costliest shape to decode for its size
    with pytest.raises(InvalidMessage, match="exceeds forseti_max_message_size"):
        big.send([0] * (LIMIT // 2 + 1))
    count = MAILBOX // LIMIT - 1  # less than a mailbox: none may be dropped, however slowly it takes them
    with misbehaving(street, f"a stream of {count} messages of {LIMIT // 2**20} MiB"):
        for _ in range(count):
            big.send(payload)
        big.send("after")
        assert big.call("seen", timeout=60) == [0] * count + ["after"]
    big.stop()


def test_neighbours_answer_while_forged_messages_arrive(street: Street) -> None:
    h, names = street.h, street.h.forseti.names
    refs = list(street.neighbours)
    incarnation = fresh("forged-incarnation")
    forged_key = fresh("forged-spawn")
    with misbehaving(street, "forged messages") as asker:
        for ref in refs[:5]:
            forge(h, names.leader, forged_exit(ref))
            forge(h, names.leader, forged_start(ref))
        forge(h, names.node_routing_key(street.host), forged_spawn(forged_key, 10**9))
        forge(h, "", forged_heartbeat(street.host, incarnation), broadcast=True)
        forge(h, "", forged_bye(street.host), broadcast=True)
        forge(h, "", forged_heartbeat(fresh("forger") + "@nowhere", leader=True, epoch=10**9), broadcast=True)
        leader_log = h.cluster.worker(street.leader)
        wait_for(lambda: incarnation in leader_log.log_text() or f"worker {street.host} lost" in leader_log.log_text(),
                 10, 0.1, "the leader never handled the forged heartbeat")
        asker.wait_rounds(2)
    # The forged epoch was not believed: the leader's own orders are still obeyed.
    after = street.h.forseti.get_key(fresh("after-forged"), timeout=10)
    assert after.call("get") == 0
    after.stop()
    if (forged := street.h.forseti.search_key(forged_key)) is not None:  # RabbitMQ: only signing refuses it
        forged.stop()


def test_neighbours_answer_while_a_fork_next_to_them_is_refused(street: Street) -> None:
    started: list[KeyRef] = []
    with pids_group() as group, misbehaving(street, "a fork refused at the pids limit"):
        join_group(group, street.worker)
        (group / "pids.max").write_text((group / "pids.current").read_text())
        # The spares at hand take new keys without a fork; the next one needs a fork.
        with pytest.raises(ResourceExhausted):
            for _ in range(10):
                started.append(street.h.forseti.get_key(fresh("pids"), timeout=10))
        assert len(started) <= 2, started  # forseti_spares
        (group / "pids.max").write_text("max")
        again = street.h.forseti.get_key(fresh("pids-after"), timeout=10)
        assert again.call("get") == 0
        started.append(again)
    for ref in started:
        ref.stop()


#: A flood that outlasts forseti_node_timeout (4 s in tests/app.py) twice, bounded in count too: about
#: three times what a worker of this machine takes, so it falls seconds behind (one client's
#: ``send`` loop does not: the worker keeps up with it).
FLOOD_FOR = 8.0
FLOOD_MAX = 600_000
#: Casts in one broker message (a client's batch).
FLOOD_BATCH = 500


def _flood(client: Forseti, ref: KeyRef, msg: Any, seconds: float, most: int) -> int:
    """Publish casts of ``msg`` to ``ref``, evenly, ``most`` of them over ``seconds``, in batches
    encoded as ``client`` encodes a cast (the same one, over and over: a flood costs its sender
    nothing); returns how many were sent."""
    casts: list[tuple[str, Any]] = []
    sender = client.client._sender
    put, sender.put = sender.put, lambda routing_key, encoded: casts.append((routing_key, encoded))  # type: ignore[method-assign]
    try:
        KeyRef(ref.node, ref.pid, ref.key, ref.name, ref.namespace, client.app).send(msg)
    finally:
        sender.put = put  # type: ignore[method-assign]
    (routing_key, encoded), = casts
    batch = [encoded] * FLOOD_BATCH
    sent, t0 = 0, time.monotonic()
    while sent < most and time.monotonic() - t0 < seconds:
        client.client._publish(routing_key, batch)
        sent += FLOOD_BATCH
        ahead = t0 + sent * seconds / most - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    return sent


@pytest.mark.parametrize("where", ["member", "leader"])
def test_neighbours_answer_and_nothing_fences_while_a_worker_is_flooded_with_casts_for_longer_than_the_node_timeout(
    street: Street, where: str
) -> None:
    """Casts published faster than the worker takes them, for twice forseti_node_timeout: to a key of
    ``street.host`` (``member``), or to the leader's own queue (``leader``: a key it does not hold,
    each cast dropped there, the broker's side of a flood all the same). Its heartbeats, the other
    workers' and the leader requests still get through, so nothing fences, nobody is declared dead,
    a new key is placed during the flood, and the excess waits in the broker."""
    h = street.h
    if where == "member":
        flooded = h.forseti.get_key(fresh("flood"))
        assert flooded.node == street.host
    else:
        flooded = KeyRef(street.leader, 1, fresh("flood"), "default", h.namespace, h.app)
    flooder = Forseti.of(client_app(h.cluster.broker_url, h.namespace))  # a client of its own, like any sender
    logs = {w.hostname: len(w.log_text()) for w in h.cluster.workers}
    result: dict[str, float] = {}
    try:
        with misbehaving(street, f"a flood of casts to the {where} for {FLOOD_FOR:g} s", timeout=60):
            thread = threading.Thread(target=lambda: result.update(
                casts=_flood(flooder, flooded, "inc", FLOOD_FOR, FLOOD_MAX)))
            t0 = time.monotonic()
            thread.start()
            wait_for(lambda: time.monotonic() - t0 > FLOOD_FOR / 2, FLOOD_FOR, 0.1)
            # A new key, placed by the leader while the flood goes on.
            placed = street.asking.get_key(fresh("during-flood"), timeout=60)
            result["placed_after"] = time.monotonic() - t0
            thread.join()
            result["flooding"] = time.monotonic() - t0
            assert placed.call("get", timeout=60) == 0
            if where == "member":
                assert flooded.call("get", timeout=60) > 0
            result["drained"] = time.monotonic() - t0
    finally:
        flooder.close()
    report(f"flood to the {where}", **result)
    # Only the cluster's own workers: a member forged by an earlier scenario (forger-…@nowhere) is
    # rightly declared dead once its forged heartbeat times out, whenever that falls.
    for worker in h.cluster.workers:
        log = worker.log_text()[logs[worker.hostname]:]
        for other in h.cluster.workers:
            assert f"worker {other.hostname} is silent; declared dead" not in log, \
                f"{worker.hostname}:\n{h.cluster.log_tails()}"
    placed.stop()
    if where == "member":
        flooded.stop()
