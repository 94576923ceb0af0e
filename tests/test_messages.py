"""Message limits: a message, args or reply that cannot be sent is refused where it is made, and a
bad message in a batch costs the others nothing (real workers, both brokers)."""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from kombu import Consumer, Producer

from forseti_celery import Forseti, InvalidArgument, InvalidKey, InvalidMessage, KeyRef
from forseti_celery.core import protocol as p
from forseti_celery.core.broker import Batcher
from forseti_celery.core.conf import Settings

from .helpers import Harness, client_app, fresh, harness

#: forseti_max_message_size by default (4 MiB).
LIMIT = 4 * 1024 * 1024


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


#: What no sender may send, and why (each fails in its own way today: see issue 10, item 4).
UNSENDABLE = {
    "a lone surrogate": ("\udcff", "not JSON-serialisable"),
    "978 levels": (_nested(978), "nested deeper than 200 levels"),
    "10**5 levels": (_nested(10**5), "nested deeper than 200 levels"),
    "over the limit": ([0] * (LIMIT // 2 + 1), "exceeds forseti_max_message_size"),
    "140 MB (RabbitMQ refuses past 128 MiB)": ("x" * 140_000_000, "exceeds forseti_max_message_size"),
}


# -- the codec on its own ---------------------------------------------------------------------
def _json(msg: Any) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


def test_a_message_is_checked_where_it_is_encoded_and_encoded_once() -> None:
    assert Settings.max_message_size == LIMIT
    encoded = p.encode_message({"t": p.CAST, "n": "n", "k": "é\t"}, "message", LIMIT, payload=_nested(200))
    assert encoded.data.decode() == '{"t":"cast","n":"n","k":"é\\t"}\t' + "[" * 200 + "0" + "]" * 200
    assert p.encode([encoded, encoded]) == encoded.data + b"\n" + encoded.data
    for value, reason in UNSENDABLE.values():
        with pytest.raises(InvalidMessage, match=reason):
            p.encode_message({"t": p.CAST}, "message", LIMIT, payload=value)
    with pytest.raises(InvalidMessage, match="args of 1025 bytes"):
        p.encode_message({"a": "x" * 1017}, "args", 1024)


def test_a_batch_decodes_without_the_messages_it_cannot_decode() -> None:
    good = [p.encode_message({"t": p.CAST, "n": "n", "k": "k"}, "message", LIMIT, payload=i) for i in range(3)]
    bad = [b"{not json", b'{"t":"cast","n":"n","k":"k","x":' + b"[" * 978 + b"]" * 978 + b"}\t1", b"42",
           b'{"t":"cast","n":"n"}\t1', b'{"t":"call","n":"n","k":"k"}\t1', b'"\xff"', b"[1]"]
    body = p.encode([good[0], *(p.Encoded(b) for b in bad[:3]), good[1], *(p.Encoded(b) for b in bad[3:]), good[2]])
    assert [p.payload(m) for m in p.decode(body)] == [0, 1, 2]
    assert p.decode(b'{"type": "worker-heartbeat"}') == [{"type": "worker-heartbeat"}]  # a Celery event
    assert p.decode(b"\xff\xfe") == []


def test_a_batch_holds_at_most_max_message_size_bytes_of_messages() -> None:
    published: list[tuple[str, int]] = []
    batcher = Batcher(lambda rk, msgs: published.append((rk, len(msgs))), max_bytes=1000)
    one = p.encode_message({"m": "x" * 290}, "message", 1000)  # 299 bytes, 301 in a batch
    for rk in ["a"] * 7 + ["b"] * 2:
        batcher._queue.append((rk, one))
    batcher.flush()
    assert published == [("a", 3), ("a", 3), ("a", 1), ("b", 2)]


def test_a_key_or_name_that_utf8_cannot_carry_is_refused_as_such(redis_url: str) -> None:
    forseti = Forseti.of(client_app(redis_url, f"forseti-t{uuid.uuid4().hex[:8]}"))
    try:
        for ask in (forseti.get_key, forseti.search_key):
            with pytest.raises(InvalidKey, match="not valid text"):
                ask("\udcff")
            with pytest.raises(InvalidArgument, match="valid text"):
                ask("k", name="\udcff")
    finally:
        forseti.close()


def test_a_payload_crosses_a_worker_as_the_bytes_it_came_in() -> None:
    # What a worker does with a broker message's body: envelopes decoded, each payload kept
    # undecoded on its line, a large line as a view of the body, then written to the keyed
    # process's pipe as that view (no copy).
    payload = _json(list(range(10_000)))
    line = _json({"t": p.CAST, "n": "n", "k": "k"}) + b"\t" + payload
    body = p.encode([p.Encoded(line),
                     p.Encoded(_json({"t": p.CALL, "n": "n", "k": "k", "r": "q", "c": "1"}) + b"\t{not json")])
    cast, call = p.decode(body)
    frame = p.encode_parts([cast, call, {"t": p.STOP, "reason": "stop"}])
    (view,) = [part for part in frame if isinstance(part, memoryview)]
    assert view.obj is body and view == line
    assert b"".join(frame) == body + b'\n{"t":"stop","reason":"stop"}'
    assert p.payload(cast) == list(range(10_000))
    with pytest.raises(InvalidMessage, match="call payload is not JSON"):
        p.payload(call)  # only where it is used: in the keyed process, for a call or cast


# -- on real workers ----------------------------------------------------------------------------
def _publish_raw(h: Harness, routing_key: str, body: bytes) -> None:
    """One broker message, forged: what a broken or hostile sender can put on a queue."""
    with h.app.connection_for_write() as conn:
        Producer(conn.default_channel).publish(
            body, exchange=h.forseti.names.exchange, routing_key=routing_key,
            content_type=p.CONTENT_TYPE, content_encoding=p.CONTENT_ENCODING)


def test_a_payload_only_its_keyed_process_could_decode_reaches_it_and_is_refused_there(
    broker_url: str, tmp_path: Path
) -> None:
    # A worker that decoded payloads would drop these calls (the caller would wait in vain): the
    # keyed process, the first to decode them, answers InvalidMessage, and lives on.
    with harness(broker_url, tmp_path, n=1) as h:
        ref = _counter(h, "raw")
        pid = ref.call("pid")
        names = h.forseti.names
        replies = names.reply_queue(f"raw{uuid.uuid4().hex[:8]}")
        undecodable = {"1": b"{not json", "2": b"[" * 5000 + b"]" * 5000, "3": b'"\xff"', "4": b'"fine"'}
        answers: dict[str, dict[str, Any]] = {}
        with h.app.connection_for_write() as conn, Consumer(
                conn.default_channel, [replies], on_message=lambda m: answers.update(
                    (a["c"], a) for a in p.decode(m.body)) or m.ack()):
            lines = [_json({"n": ref.name, "k": ref.key, "p": ref.pid, "t": p.CALL, "r": replies.name,
                            "c": corr}) + b"\t" + payload for corr, payload in undecodable.items()]
            _publish_raw(h, names.node_routing_key(ref.node), b"\n".join(lines))
            deadline = time.monotonic() + 10
            while len(answers) < len(undecodable) and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError, socket.timeout):
                    conn.drain_events(timeout=0.5)
        assert answers["1"]["error"] == "invalid" and "call payload is not JSON" in answers["1"]["msg"]
        assert answers["2"]["error"] == "invalid" and "nested deeper than 200" in answers["2"]["msg"]
        assert answers["3"]["error"] == "invalid" and "call payload is not JSON" in answers["3"]["msg"]
        assert "error" not in answers["4"] and p.payload(answers["4"]) == ["echo", "fine"]
        assert ref.call("pid") == pid
        log = h.cluster.workers[0].log_text()
        assert "undecodable" not in log, h.cluster.log_tails()
        assert log.count(f"keyed process {ref.key!r} (pid {pid}) dropped a call") == 3, h.cluster.log_tails()


def _counter(h: Harness, prefix: str) -> KeyRef:
    ref = h.forseti.get_key(fresh(prefix))
    assert ref.call("seen") == []
    return ref


@pytest.mark.parametrize("how", ["send", "call"])
def test_a_message_that_cannot_be_sent_is_refused_at_the_caller_and_costs_the_messages_around_it_nothing(
    broker_url: str, tmp_path: Path, how: str
) -> None:
    with harness(broker_url, tmp_path, n=1) as h:
        ref = _counter(h, "refused")
        sent = 0
        for name, (value, reason) in UNSENDABLE.items():
            for _ in range(50):
                ref.send(sent)
                sent += 1
            t0 = time.perf_counter()
            with pytest.raises(InvalidMessage, match=reason):
                ref.send(value) if how == "send" else ref.call(value)
            took = time.perf_counter() - t0
            print(f"\n{broker_url.split(':')[0]} {how} of {name}: refused in {took * 1000:.0f} ms")
        for _ in range(50):
            ref.send(sent)
            sent += 1
        # Nothing of what was refused reached the process, nothing around it was lost, in order.
        assert ref.call("seen") == list(range(sent))
        assert ref.call("get") == 0


def test_one_undecodable_message_in_a_batch_costs_the_other_messages_of_the_batch_nothing(
    broker_url: str, tmp_path: Path
) -> None:
    with harness(broker_url, tmp_path, n=1) as h:
        ref = _counter(h, "batch")
        envelope = _json({"n": ref.name, "k": ref.key, "p": ref.pid, "t": p.CAST})
        casts = [envelope + b"\t" + _json(i) for i in range(200)]
        poison = [b"{not json", b'{"t":"cast","x":' + b"[" * 978 + b"]" * 978 + b"}\t1", b"42",
                  b'{"t":"cast","n":"default"}\t1', b'{"t":"call","n":"default","k":"x"}\t1',
                  envelope + b"\t{not json"]
        body = b"\n".join([*casts[:100], *poison, *casts[100:]])  # as forseti batches
        # One broker message, forged: what a broken or hostile sender can put on a worker's queue.
        _publish_raw(h, h.forseti.names.node_routing_key(ref.node), body)
        assert ref.call("seen") == list(range(200))
        log = h.cluster.workers[0].log_text()
        assert "undecodable or malformed messages of a batch of 206" in log
        # A payload the worker forwarded undecoded, the keyed process could not decode: its loss alone.
        assert f"keyed process {ref.key!r}" in log and "dropped a cast: cast payload is not JSON" in log


def _cpu_seconds(pid: int) -> float:
    """CPU time (user and system, every thread) ``pid`` has used so far."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


#: Sends argv[4] casts of a list of argv[5] zeros to key argv[3] (name "recorder") of namespace
#: argv[2] on broker argv[1]; prints the seconds each send() took, as JSON.
_SENDER = """
import json, sys, time
from forseti_celery import Forseti
from tests.helpers import client_app
url, namespace, key, count, zeros = sys.argv[1:]
forseti = Forseti.of(client_app(url, namespace))
ref, payload, took = forseti.get_key(key, name="recorder"), [0] * int(zeros), []
for _ in range(int(count)):
    t0 = time.perf_counter()
    ref.send(payload)
    took.append(time.perf_counter() - t0)
forseti.close()
print(json.dumps(took))
"""


def _sender(h: Harness, broker_url: str, key: str, count: int, zeros: int) -> subprocess.Popen[str]:
    """A client process sending ``count`` lists of ``zeros`` zeros to ``key``: the test's own
    process then measures the neighbours without competing for its interpreter with the encoding."""
    return subprocess.Popen([sys.executable, "-c", _SENDER, broker_url, h.namespace, key, str(count), str(zeros)],
                            cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, text=True)


def _sent(sender: subprocess.Popen[str]) -> list[float]:
    out, _ = sender.communicate(timeout=120)
    assert sender.returncode == 0, out
    return [float(t) for t in json.loads(out)]


def test_a_stream_of_messages_at_the_limit_holds_up_no_other_key_and_one_over_it_is_never_sent(
    broker_url: str, tmp_path: Path
) -> None:
    # The stream comes from a client process of its own. Its key keeps only the first item of each
    # message, and has a mailbox for all of them: this is about the worker's threads, not about
    # memory or the mailbox bound (tests/test_mailbox.py).
    with harness(broker_url, tmp_path, n=1, FORSETI_MAILBOX_LIMIT=str(32 * LIMIT)) as h:
        big = h.forseti.get_key(fresh("big"), name="recorder")
        neighbours = {h.forseti.get_key(fresh(f"nb{i}")): i for i in range(20)}
        for ref, value in neighbours.items():
            for _ in range(value):
                ref.send("inc")
        assert {ref.node for ref in neighbours} == {big.node}
        # The largest list of zeros that fits: the costliest to decode for its size, but for
        # lists of lists (see docs/failure-model.rst, "Message limits").
        envelope = len(_json({"n": big.name, "k": big.key, "p": big.pid, "t": p.CAST})) + 1  # and the tab
        payload = [0] * ((LIMIT - envelope - 1) // 2)
        with pytest.raises(InvalidMessage, match="exceeds forseti_max_message_size"):
            big.send([*payload, 0])
        with pytest.raises(InvalidMessage, match="exceeds forseti_max_message_size"):
            big.send([0] * (5 * LIMIT))  # a worker would take seconds to decode and re-encode it
        worker = h.cluster.workers[0]
        started_at = len(worker.log_text())  # a worker starting on a loaded machine may stall once
        mib = 10 * LIMIT / 2**20

        # What the stream costs the worker (its threads that heartbeat and route included): a
        # worker that decoded and re-encoded the payloads would spend ~0.1 s of CPU per MiB.
        cpu = _cpu_seconds(worker.pid)
        _sent(_sender(h, broker_url, big.key, 10, len(payload)))
        assert len(big.call("seen", timeout=60)) == 10
        per_mib = (_cpu_seconds(worker.pid) - cpu) / mib

        # Meanwhile, 20 neighbours on the same worker keep answering.
        latencies: list[float] = []
        stop = threading.Event()
        failures: list[BaseException] = []

        def ask() -> None:
            try:
                while not stop.is_set():
                    for ref, value in neighbours.items():
                        t0 = time.perf_counter()
                        assert ref.call("get", timeout=5) == value
                        latencies.append(time.perf_counter() - t0)
            except BaseException as exc:
                failures.append(exc)
        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        try:
            sends = _sent(_sender(h, broker_url, big.key, 10, len(payload)))
            big.send("after")
            assert big.call("seen", timeout=60) == [0] * 20 + ["after"]  # in order, none lost
        finally:
            stop.set()
            asker.join(10)
        assert not failures, failures
        log = worker.log_text()[started_at:]
        assert "did not run for" not in log, h.cluster.log_tails()
        assert "has not heard the broker" not in log, h.cluster.log_tails()
        print(f"\n{broker_url.split(':')[0]}: 10 sends of {LIMIT} bytes cost the worker {per_mib * 1000:.1f} ms "
              f"of CPU per MiB; 10 more (send() {statistics.median(sends) * 1000:.0f} ms median): "
              f"{len(latencies)} neighbour calls meanwhile, median {statistics.median(latencies) * 1000:.1f} ms, "
              f"max {max(latencies) * 1000:.0f} ms")
        assert per_mib < 0.04, f"{per_mib * 1000:.1f} ms of the worker's CPU per MiB"


def test_a_reply_that_cannot_be_sent_is_an_error_at_the_caller_and_the_process_lives_on(
    broker_url: str, tmp_path: Path
) -> None:
    # The workers' limit is below the client's: a small call can ask for a reply too large.
    with harness(broker_url, tmp_path, n=1, FORSETI_MAX_MESSAGE_SIZE="65536") as h:
        ref = _counter(h, "reply")
        pid = ref.call("pid")
        too_large = r"reply of (at least )?\d+ bytes \(encoded\) exceeds forseti_max_message_size \(65536 bytes\)"
        with pytest.raises(InvalidMessage, match=too_large):
            ref.call({"big": 100_000})
        with pytest.raises(InvalidMessage, match="reply is nested deeper than 200 levels"):
            ref.call({"nest": 960})  # crashed the process before (RecursionError while encoding)
        with pytest.raises(InvalidMessage, match="reply is nested deeper than 200 levels"):
            ref.call({"nest": 201})
        assert ref.call({"nest": 200}) == _nested(200)
        assert len(ref.call({"big": 60_000})) == 60_000
        assert ref.call("pid") == pid
        log = h.cluster.workers[0].log_text()
        assert log.count("could not answer a call") == 3, h.cluster.log_tails()
