"""A sync caller reads its own answer (issue 15): the client's consumer work is a role
(``core.baton.Baton``) a caller takes once its request is sent, on Redis and on RabbitMQ, with real
workers: answers right under threads and processes calling at once while exits invalidate
cached refs, a connection lost while a caller reads, a caller's timeout, asyncio callers beside."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import forseti_celery
from forseti_celery import ForsetiTimeout
from forseti_celery.client.client import Client
from forseti_celery.client.requests import Pending
from forseti_celery.core import baton as baton_module
from forseti_celery.core.baton import Baton
from forseti_celery.testing import wait_for

from .helpers import Harness, fresh, harness


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    url = request.getfixturevalue(f"{request.param}_url")
    with harness(url, tmp_path_factory.mktemp(f"drive-{request.param}")) as h:
        yield h


@pytest.fixture
def delivered(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread that handed each sync caller its answer."""
    names: list[str] = []
    deliver = Pending.deliver

    def spy(self: Pending, reply: Any) -> None:
        names.append(threading.current_thread().name)
        deliver(self, reply)

    monkeypatch.setattr(Pending, "deliver", spy)
    return names


def _client(h: Harness) -> Client:
    client = h.forseti.client
    client.ensure_started()
    wait_for(lambda: client._loop.connected.is_set(), 20, message="the client's loop never connected")
    return client


def _baton(client: Client) -> Baton:
    baton = client._loop._baton
    assert baton is not None
    return baton


def _held_by_a_caller(baton: Baton) -> bool:
    return baton._holder == "caller"


def test_a_lone_caller_reads_its_own_answer(h: Harness, delivered: list[str]) -> None:
    ref = h.forseti.get_key(fresh("lone"))
    _client(h)
    for i in range(3):
        ref.call(i)
    delivered.clear()
    me = threading.current_thread().name
    assert [ref.call(["n", i]) for i in range(50)] == [["echo", ["n", i]] for i in range(50)]
    # The reply thread hands an answer over only when the caller could not take the reads (an
    # answer read with the wake-up that asked for them).
    assert delivered.count(me) > len(delivered) // 2, delivered
    ref.stop()


def _killed_meanwhile(h: Harness, client: Client, stop: threading.Event) -> int:
    """Kill keyed processes whose refs ``client`` cached, while ``stop`` is unset: each is dropped from
    its cache by the exit event (handled by whoever reads). How many were killed."""
    killed = 0
    while not stop.is_set() and killed < 4:
        ref = client.get_key(fresh("victim"), (), "default", 20)
        wait_for(lambda r=ref: client._cache.lookup("default", r.key)[0] is r, 20, 0.01,  # type: ignore[misc]
                 "the ref was never cached")
        os.kill(ref.pid, signal.SIGKILL)
        wait_for(lambda r=ref: client._cache.lookup("default", r.key)[0] is None, 20, 0.005,  # type: ignore[misc]
                 "a killed process's ref stayed cached while callers read")
        killed += 1
    return killed


_forked_app: Any = None  # the app a forked child calls with (set before the fork)


def _forked_calls(keys: list[str]) -> list[Any]:  # in the child: a fresh client of its own
    return [forseti_celery.call(keys[i % len(keys)], ["f", i], app=_forked_app, timeout=30) for i in range(100)]


def _calls_in_a_fork(h: Harness, keys: list[str]) -> None:
    global _forked_app
    _forked_app = h.app
    with multiprocessing.get_context("fork").Pool(1) as pool:
        out = pool.apply(_forked_calls, (keys,))
    assert out == [["echo", ["f", i]] for i in range(100)], out


def test_threads_and_processes_calling_at_once_while_exits_invalidate_cached_refs(
        h: Harness, delivered: list[str]) -> None:
    client = _client(h)
    refs = [h.forseti.get_key(fresh(f"hammer{i}")) for i in range(3)]
    keys = [fresh(f"forked{i}") for i in range(2)]
    for key in keys:
        forseti_celery.call(key, "get", app=h.app)
    stop = threading.Event()

    def calls(t: int) -> list[Any]:
        return [refs[(t + i) % 3].call(["ask", t, i]) for i in range(150)]

    with ThreadPoolExecutor(8) as pool:
        hammer = pool.map(calls, range(6))
        killer = pool.submit(_killed_meanwhile, h, client, stop)
        forks = [pool.submit(_calls_in_a_fork, h, keys) for _ in range(2)]
        answers = list(hammer)
        stop.set()
        assert killer.result() >= 1
        for fork in forks:
            fork.result()
    assert answers == [[["echo", ["ask", t, i]] for i in range(150)] for t in range(6)]
    assert client.pending == {}
    assert any(name.startswith("ThreadPoolExecutor") for name in delivered), set(delivered)
    for ref in refs:
        ref.stop()


def _consumer_socket(client: Client) -> socket.socket:
    loop = client._loop
    if loop._fast is not None:
        sock: socket.socket = loop._fast._conn._sock
        return sock
    assert loop._consumer is not None
    return loop._consumer.channel.connection.transport.sock  # type: ignore[no-any-return]


def test_a_connection_lost_while_a_caller_reads_comes_back(h: Harness) -> None:
    client = _client(h)
    ref = h.forseti.get_key(fresh("lost"))
    baton = _baton(client)
    before = client._loop._fast or client._loop._consumer
    answers: list[Any] = []
    caller = threading.Thread(target=lambda: answers.append(ref.call({"sleep": 1.0}, timeout=30)))
    caller.start()
    wait_for(lambda: _held_by_a_caller(baton), 10, 0.001, "no caller took the reads")
    _consumer_socket(client).shutdown(socket.SHUT_RDWR)
    caller.join(40)
    assert answers == ["slept"]
    wait_for(lambda: client._loop.connected.is_set() and (client._loop._fast or client._loop._consumer)
             not in (None, before), 20, message="the loop never reconnected")
    assert ref.call("again") == ["echo", "again"]
    ref.stop()


def test_a_caller_timing_out_while_it_reads_gives_the_reads_back(
        h: Harness, monkeypatch: pytest.MonkeyPatch, delivered: list[str]) -> None:
    client = _client(h)
    ref = h.forseti.get_key(fresh("late"))
    baton = _baton(client)
    took: list[bool] = []
    take = baton.take

    def spy(until: float) -> bool:
        took.append(got := take(until))
        return got

    monkeypatch.setattr(baton, "take", spy)
    with pytest.raises(ForsetiTimeout):
        ref.call({"sleep": 1.5}, timeout=0.3)
    assert took and took[0] is True  # it read while it waited
    assert not _held_by_a_caller(baton)
    wait_for(lambda: baton._holder == "loop", 10, 0.001, "the loop thread never took the reads back")
    # An async caller (answered by the reply thread) and a sync one both get their answer.
    assert asyncio.run(ref.acall("async")) == ["echo", "async"]
    assert ref.call("sync", timeout=10) == ["echo", "sync"]
    ref.stop()


def test_an_async_caller_after_a_sync_one_has_the_reply_thread_read_its_answer(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # The role a sync caller gave back is free: the loop thread would take it back only after
    # LINGER (made a minute here); an async caller, whom no sync caller reads for, calls it back.
    monkeypatch.setattr(baton_module, "LINGER", 60.0)
    monkeypatch.setattr(baton_module, "LOOK", 60.0)
    client = _client(h)
    ref = h.forseti.get_key(fresh("after"))
    baton = _baton(client)
    for i in range(3):
        assert ref.call(i) == ["echo", i]
        # As a sync caller leaves it (whether this one took it or found its answer read already):
        assert baton.take(time.monotonic() + 10)
        baton.give_back(False)
        assert asyncio.run(ref.acall(["a", i], timeout=10)) == ["echo", ["a", i]]
    ref.stop()


def test_asyncio_callers_beside_sync_callers(h: Harness, delivered: list[str]) -> None:
    _client(h)
    refs = [h.forseti.get_key(fresh(f"mixed{i}"), args=(i,)) for i in range(3)]
    results: dict[int, Any] = {}

    async def awaiting(i: int) -> list[Any]:
        return list(await asyncio.gather(*[refs[i % 3].acall(["a", i, n]) for n in range(100)]))

    def in_thread(i: int) -> None:
        if i % 2:
            results[i] = asyncio.run(awaiting(i))
        else:
            results[i] = [refs[i % 3].call(["a", i, n]) for n in range(100)]

    threads = [threading.Thread(target=in_thread, args=(i,), name=f"mixed-{i}") for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: [["echo", ["a", i, n]] for n in range(100)] for i in range(6)}
    assert h.forseti.client.pending == {}
    assert any(name.startswith("mixed-") for name in delivered), set(delivered)
    for ref in refs:
        ref.stop()


def test_the_role_is_handed_over_once_then_taken_while_free_and_called_back() -> None:
    baton = Baton()
    try:
        assert baton.take(0.0) is False  # not connected: callers wait for the loop thread
        baton.enable(True)
        assert baton.hand_over() is False  # nobody asked (or the caller gave up): the loop thread reads on
        got: list[bool] = []
        caller = threading.Thread(target=lambda: got.append(baton.take(float("inf"))))
        caller.start()
        wait_for(lambda: baton.wanted, 10, 0.001, "the caller never asked for the role")
        assert baton.hand_over() is True
        caller.join(10)
        assert got == [True] and baton.take(0.0) is False  # one caller at a time
        baton.give_back(False)
        assert baton.take(0.0) is True  # free: taken without the loop thread
        baton.call_back()  # an async caller's answer: the loop thread once this caller is done
        baton.give_back(False)
        assert baton._resume.is_set()
    finally:
        baton.close()


@pytest.mark.skipif(not hasattr(os, "eventfd"), reason="eventfd: Linux")
def test_a_closed_baton_never_writes_the_fd_number_reused_since() -> None:
    baton = Baton()
    baton.close()
    reused = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        baton.wake()
        with pytest.raises(BlockingIOError):
            os.read(reused, 8)
    finally:
        os.close(reused)
