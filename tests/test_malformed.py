"""Malformed messages and a dead zygote against a real cluster, on both brokers: anyone who can write
to the broker (every client) can put any bytes on the leader queue and on a worker's queue. A message
that is no valid request is dropped or skipped on its own: the valid ones around it are served, the
leader keeps its role, no worker's consumer thread fails, no keyed process is hurt."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from forseti_celery.core import protocol as p
from forseti_celery.testing import wait_for

from .helpers import Harness, alive, fresh, harness
from .test_forged import leader_of, live_key
from .test_messages import _publish_raw

#: What a worker logs when a batch or a tick escaped its handlers (the consumer thread then failed).
LOOP_FAILURES = ("could not handle a message", "tick failed", "forseti-node failed", "callback failed", "gave up")


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    url = request.getfixturevalue(f"{request.param}_url")
    with harness(url, tmp_path_factory.mktemp(request.param), n=2, pool="solo") as h:
        yield h


def _line(msg: dict[str, Any], payload: Any = p.NO_PAYLOAD) -> bytes:
    return p.encode_message(msg, "message", 2**30, payload=payload).data


def _poison(to: dict[str, Any]) -> list[bytes]:
    """Every shape of malformed message a client could write; ``to``: a live key's address."""
    reply = {"r": "nobody", "c": uuid.uuid4().hex}
    return [
        b'{"x":1}', b'{"t":[1]}', b"{}", b'{"type":"worker-heartbeat"}', b'{"t":null}',
        b'{"t":"get","n":[1],"k":"a"}', b'{"t":"get","n":"default","k":"no-reply-queue"}',
        b'{"t":"search","n":"default","k":"x"}', b'{"t":"metrics"}', b'{"t":"stop_key","n":"default","k":"x"}',
        _line({"t": p.GET, "n": "default", "k": "x", **reply, "d": "soon"}),
        b'{"t":"get","n":"default","k":"x","r":"nobody","c":"1","d":NaN}',
        _line({"t": p.GET, "n": "default", "k": "x", **reply, "a": "not a list"}),
        _line({"t": p.CAST, **to}), _line({"t": p.CALL, **to, **reply}),  # no message
        b'{"t":"stop","n":"default"}',
        # Worker messages (unsigned: no worker secret here) missing what their handlers read.
        b'{"t":"hb"}', b'{"t":"bye"}', b'{"t":"report"}', b'{"t":"report?"}', b'{"t":"spawned"}',
        b'{"t":"exited","n":"default"}', b'{"t":"spawn","n":"default","k":"x"}', b'{"t":"leads","nonce":1}',
    ]


def _interleaved(valid: list[bytes], poison: list[bytes]) -> bytes:
    lines = []
    for i, bad in enumerate(poison):
        lines += [valid[i % len(valid)], bad]
    return b"\n".join(lines + valid)


def _log_sizes(h: Harness) -> dict[str, int]:
    return {w.hostname: len(w.log_text()) for w in h.cluster.workers}


def _new_logs(h: Harness, since: dict[str, int]) -> str:
    return "\n".join(w.log_text()[since[w.hostname]:] for w in h.cluster.workers)


def test_malformed_messages_on_the_leader_and_worker_queues_cost_the_valid_ones_nothing(h: Harness) -> None:
    since = _log_sizes(h)
    leader = leader_of(h)
    ref = live_key(h, "malformed")  # state 3
    to = {"n": ref.name, "k": ref.key, "p": ref.pid}
    poison = _poison(to)
    casts = [_line({"t": p.CAST, **to}, "inc") for _ in range(len(poison))]
    reply_rk = h.forseti.client._reply_rk  # answers to correlation ids it never asked: ignored
    wanted = [fresh("valid-get") for _ in range(4)]
    gets = [_line({"t": p.GET, "n": "default", "k": k, "a": [], "r": reply_rk, "c": uuid.uuid4().hex,
                   "d": time.time() + 30}) for k in wanted]
    for round_ in range(3):
        _publish_raw(h, h.forseti.names.leader, _interleaved(gets if round_ == 0 else gets[:1], poison))
        for worker in h.cluster.workers:
            body = _interleaved(casts, poison) if worker.hostname == ref.node else b"\n".join(poison)
            _publish_raw(h, h.forseti.names.node_routing_key(worker.hostname), body)
        # Valid requests from a client, between the forged bodies.
        assert h.forseti.get_key(fresh("between"), timeout=10).call("get") == 0
    assert ref.call("get") == 3 + 3 * 2 * len(poison), "casts batched with malformed messages were lost"
    assert h.forseti.search_key(ref.key) == ref and alive(ref.pid)
    for key in wanted:  # placed by the leader although their answers go nowhere
        wait_for(lambda key=key: h.forseti.search_key(key), 10, 0.1, f"{key} was never placed")
    assert leader_of(h) == leader
    logs = _new_logs(h, since)
    print(f"\n[malformed] {3 * len(poison) * (1 + len(h.cluster.workers))} malformed messages; worker log lines "
          f"about them: {sum('malformed' in line or 'no type' in line for line in logs.splitlines())}")
    assert "no longer leads" not in logs
    assert not [f for f in LOOP_FAILURES if f in logs], logs[-3000:]


def test_a_stop_with_a_nan_grace_kills_a_process_that_ignores_it_after_the_stop_timeout(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("nan-grace"), name="lingering", args=[3600])  # terminate takes an hour
    body = json.dumps({"t": p.STOP, "n": ref.name, "k": ref.key, "p": ref.pid, "reason": "stop",
                       "grace": float("nan")}).encode()  # NaN: json writes it, and reads it back
    assert b"NaN" in body
    t0 = time.monotonic()
    _publish_raw(h, h.forseti.names.node_routing_key(ref.node), body)
    wait_for(lambda: not alive(ref.pid), 30, 0.1, "a stop with grace NaN never killed its process")
    print(f"\n[nan grace] killed after {time.monotonic() - t0:.1f} s (forseti_stop_timeout: 5 s)")
    assert h.forseti.search_key(ref.key) is None or wait_for(
        lambda: h.forseti.search_key(ref.key) is None, 10, 0.1, "the killed process's key was never freed")


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _cpu_ticks(pid: int) -> int:
    """Clock ticks of CPU (user and system, every thread) ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _cpu_share(pid: int, window: float = 2.0) -> float:
    """Share of one core ``pid`` used over ``window`` seconds."""
    before, t0 = _cpu_ticks(pid), time.monotonic()
    time.sleep(window)  # the measurement window
    return (_cpu_ticks(pid) - before) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0)


def test_a_worker_whose_zygote_died_stays_idle_and_still_starts_new_keys(h: Harness) -> None:
    # Last in this module: the worker forks its keyed processes itself from now on.
    ref = h.forseti.get_key(fresh("zygote-child"))
    worker = next(w for w in h.cluster.workers if w.hostname == ref.node)
    zygote = _ppid(ref.pid)
    assert zygote != worker.pid and _ppid(zygote) == worker.pid, "the key was not forked by a zygote"
    idle = _cpu_share(worker.pid)
    os.kill(zygote, signal.SIGKILL)
    wait_for(lambda: not alive(zygote), 10, 0.05, "the zygote outlived SIGKILL")
    # Its spares and keyed processes die with it; the worker frees their keys.
    wait_for(lambda: not alive(ref.pid), 10, 0.05, "the zygote's keyed process outlived it")
    after = _cpu_share(worker.pid)
    print(f"\n[dead zygote] worker CPU: {idle:.0%} of a core before, {after:.0%} after the zygote died")
    assert after < 0.5, "the worker spins since its zygote died"
    refs = [h.forseti.get_key(fresh("after-zygote"), timeout=10) for _ in range(6)]
    mine = [r for r in refs if r.node == worker.hostname]
    assert mine, "no new key was placed on the worker that lost its zygote"
    for r in mine:
        assert r.call("get") == 0 and _ppid(r.pid) == worker.pid  # forked by the worker itself
