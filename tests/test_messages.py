"""Message limits: a message, args or reply that cannot be sent is refused where it is made, and a
bad message in a batch costs the others nothing (real workers, both brokers)."""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kombu import Producer

from forseti_celery import Forseti, InvalidArgument, InvalidKey, InvalidMessage, KeyRef
from forseti_celery import protocol as p
from forseti_celery.broker import Batcher
from forseti_celery.conf import Settings

from .helpers import Harness, client_app, fresh, harness

#: forseti_max_message_size by default (1 MiB).
LIMIT = 1024 * 1024


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
    encoded = p.encode_message({"t": p.CAST, "n": "n", "k": "é", "m": _nested(200)}, "message", LIMIT)
    assert encoded.data.decode() == '{"t":"cast","n":"n","k":"é","m":' + "[" * 200 + "0" + "]" * 200 + "}"
    assert p.encode([encoded, encoded]) == b"[" + encoded.data + b",\n" + encoded.data + b"]"
    for value, reason in UNSENDABLE.values():
        with pytest.raises(InvalidMessage, match=reason):
            p.encode_message({"t": p.CAST, "m": value}, "message", LIMIT)
    with pytest.raises(InvalidMessage, match="args of 1025 bytes"):
        p.encode_message({"a": "x" * 1017}, "args", 1024)


def test_a_batch_decodes_without_the_messages_it_cannot_decode() -> None:
    good = [p.encode_message({"t": p.CAST, "n": "n", "k": "k", "m": i}, "message", LIMIT) for i in range(3)]
    bad = [b"{not json", b'{"t":"cast","n":"n","k":"k","m":' + b"[" * 978 + b"]" * 978 + b"}", b"42",
           b'{"t":"cast","n":"n"}', b'{"t":"call","n":"n","k":"k","m":1}', b'"\xff"']
    body = p.encode([good[0], *(p.Encoded(b) for b in bad[:3]), good[1], *(p.Encoded(b) for b in bad[3:]), good[2]])
    assert [m["m"] for m in p.decode(body)] == [0, 1, 2]
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


# -- on real workers ----------------------------------------------------------------------------
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
        casts = [_json({"n": ref.name, "k": ref.key, "p": ref.pid, "t": p.CAST, "m": i}) for i in range(200)]
        poison = [b"{not json", b'{"t":"cast","m":' + b"[" * 978 + b"]" * 978 + b"}", b"42",
                  b'{"t":"cast","n":"default"}', b'{"t":"call","n":"default","k":"x","m":1}']
        body = b"[" + b",\n".join([*casts[:100], *poison, *casts[100:]]) + b"]"  # as forseti batches
        # One broker message, forged: what a broken or hostile sender can put on a worker's queue.
        with h.app.connection_for_write() as conn:
            Producer(conn.default_channel).publish(
                body, exchange=h.forseti.names.exchange, routing_key=h.forseti.names.node_routing_key(ref.node),
                content_type=p.CONTENT_TYPE, content_encoding=p.CONTENT_ENCODING)
        assert ref.call("seen") == list(range(200))
        assert "undecodable or malformed messages of a batch of 205" in h.cluster.workers[0].log_text()


def test_a_message_just_under_the_limit_holds_up_no_other_key_and_one_over_it_is_never_sent(
    broker_url: str, tmp_path: Path
) -> None:
    with harness(broker_url, tmp_path, n=1) as h:
        big = _counter(h, "big")
        neighbours = {h.forseti.get_key(fresh(f"nb{i}")): i for i in range(20)}
        for ref, value in neighbours.items():
            for _ in range(value):
                ref.send("inc")
        assert {ref.node for ref in neighbours} == {big.node}
        # The largest list of zeros that fits: the costliest to decode for its size, but for
        # lists of lists (see docs/failure-model.rst, "Message limits").
        envelope = len(_json({"n": big.name, "k": big.key, "p": big.pid, "t": p.CAST, "m": []}))
        payload = [0] * ((LIMIT - envelope + 1) // 2)
        with pytest.raises(InvalidMessage, match="exceeds forseti_max_message_size"):
            big.send([*payload, 0])
        with pytest.raises(InvalidMessage, match="exceeds forseti_max_message_size"):
            big.send([0] * 5_000_000)  # 10 MB: a worker would take seconds to decode and re-encode it
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
        worker = h.cluster.workers[0]
        started_at = len(worker.log_text())  # a worker starting on a loaded machine may stall once
        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        sends = []
        try:
            for _ in range(10):
                t0 = time.perf_counter()
                big.send(payload)
                sends.append(time.perf_counter() - t0)
            big.send("inc")
            assert big.call("get", timeout=30) == 1  # after the ten, in order
        finally:
            stop.set()
            asker.join(10)
        assert not failures, failures
        log = worker.log_text()[started_at:]
        assert "did not run for" not in log, h.cluster.log_tails()
        assert "has not heard the broker" not in log, h.cluster.log_tails()
        assert big.call("count") == 11
        print(f"\n{broker_url.split(':')[0]}: 10 sends of {LIMIT} bytes (send() {statistics.median(sends) * 1000:.0f} "
              f"ms median); {len(latencies)} neighbour calls meanwhile, median "
              f"{statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.0f} ms")


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
