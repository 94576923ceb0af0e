"""A stream of key-addressed sends across hundreds of passivations loses and repeats nothing (issue 12).

Four client processes (real OS processes, each its own client) send ``forseti_celery.send`` to 50
keys of a name that passivates after 0.5 s idle. The gaps between one key's messages are random
(exponential, about one burst a second per key), so keys passivate hundreds of times, many of
them just as a message arrives. Every incarnation appends what it handled to the key's Redis
log (``tests/keyed_app.py``); afterwards every message must be there exactly once, and each
sender's messages to a key in the order it sent them.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pytest

from forseti_celery import Forseti
from forseti_celery.testing import wait_for

from .helpers import client_app
from .keyed_app import record_key
from .test_key_addressed import KeyedCluster, keyed_cluster

KEYS = 50
SENDERS = 4
#: Wanted passivations; the stream runs until they happened (or MAX_SECONDS).
PASSIVATIONS = 300
MAX_SECONDS = 60.0
#: Mean pause between one sender's bursts: with 4 senders, about one burst per key a second.
PAUSE = SENDERS / KEYS


def _sender(broker_url: str, namespace: str, sender: int, keys: list[str], stop: Event,
            results: multiprocessing.Queue[Any]) -> None:
    """Send bursts of ``{"s": sender, "i": n}`` to random keys until ``stop``; report the counts."""
    forseti = Forseti.of(client_app(broker_url, namespace))
    rng = random.Random(sender)
    sent = dict.fromkeys(keys, 0)
    try:
        while not stop.is_set():
            key = rng.choice(keys)
            for _ in range(rng.randint(1, 3)):
                forseti.send(key, {"s": sender, "i": sent[key]}, name="ka_idle", args=(key,))
                sent[key] += 1
            time.sleep(rng.expovariate(1 / PAUSE))
    finally:
        forseti.close()  # sends what is queued
        results.put((sender, sent))


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_key_addressed_sends_across_hundreds_of_passivations_are_handled_once_each_in_order_per_sender(
    broker: str, request: pytest.FixtureRequest, redis_url: str, tmp_path: Path
) -> None:
    url: str = request.getfixturevalue(f"{broker}_url")
    with keyed_cluster(url, redis_url, tmp_path, n=2, KA_IDLE_TIMEOUT="0.5") as kc:
        keys = [f"stream-{i}" for i in range(KEYS)]
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        results: multiprocessing.Queue[Any] = ctx.Queue()
        senders = [ctx.Process(target=_sender, args=(url, kc.namespace, s, keys, stop, results))
                   for s in range(SENDERS)]
        for p in senders:
            p.start()
        try:
            started = time.monotonic()
            while _passivations(kc, keys) < PASSIVATIONS and time.monotonic() - started < MAX_SECONDS:
                assert all(p.is_alive() for p in senders), "a sender died"
                time.sleep(0.5)
        finally:
            stop.set()
            sent = dict(results.get(timeout=30) for _ in senders)
            for p in senders:
                p.join(10)
        assert all(p.exitcode == 0 for p in senders)
        total = sum(sum(counts.values()) for counts in sent.values())
        wait_for(lambda: sum(kc.db.llen(record_key("log", k, kc.namespace)) for k in keys) >= total, 60, 0.2,
                 lambda: f"handled {sum(len(kc.log(k)) for k in keys)} of {total} messages")
        time.sleep(1.0)  # a duplicate would show up after the last message
        for key in keys:
            handled = kc.log(key)
            for s in range(SENDERS):
                mine = [m["i"] for m in handled if m["s"] == s]
                assert mine == list(range(sent[s][key])), (key, s, _first_difference(mine, sent[s][key]))
        assert sum(len(kc.log(k)) for k in keys) == total
        passivations = _passivations(kc, keys)
        assert passivations >= 200, f"only {passivations} passivations in the stream"
        reasons = {r for k in keys for r in kc.ends(k)}
        assert reasons == {"idle"}, reasons


def _passivations(kc: KeyedCluster, keys: list[str]) -> int:
    return sum(kc.db.llen(record_key("end", k, kc.namespace)) for k in keys)


def _first_difference(got: list[int], n: int) -> str:
    for i, (a, b) in enumerate(zip(got, range(n), strict=False)):
        if a != b:
            return f"at {i}: got {a}, expected {b}: {json.dumps(got[max(0, i - 3):i + 4])}"
    return f"got {len(got)} messages, sent {n}"
