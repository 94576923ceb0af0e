"""An event loop reads its own answers while the client's consumer work is free (issue 15, row 17c):
``forseti_celery.client.loop_reads``, on real workers, both brokers (RabbitMQ: the reply thread
reads them, as before), and its check that an answer is whole in the socket before it reads."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from forseti_celery.client.aio import AsyncPending
from forseti_celery.client.client import Client
from forseti_celery.client.loop_reads import reply_end, whole_reply
from forseti_celery.client.requests import Pending
from forseti_celery.core import baton as baton_module
from forseti_celery.testing import wait_for

from .helpers import Harness, fresh, harness


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    url = request.getfixturevalue(f"{request.param}_url")
    with harness(url, tmp_path_factory.mktemp(f"loopreads-{request.param}"), n=1) as h:
        yield h


@pytest.fixture
def free_long(h: Harness, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    """The client, its consumer work left free by a caller for a minute (LINGER) instead of 5 ms:
    what a loop may read does not depend on the machine's speed. Called back at the end."""
    monkeypatch.setattr(baton_module, "LINGER", 60.0)
    monkeypatch.setattr(baton_module, "LOOK", 60.0)
    client = h.forseti.client
    client.ensure_started()
    wait_for(lambda: client._loop.connected.is_set(), 20, message="the client's loop never connected")
    yield client
    baton = client._loop._baton
    assert baton is not None
    baton.call_back()
    wait_for(lambda: baton._holder == "loop", 10, 0.001, "the loop thread never took the work back")


@pytest.fixture
def deliveries(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, str]]:
    """Each answer handed over: (its waiter, the thread that handed it)."""
    seen: list[tuple[Any, str]] = []
    for cls in (Pending, AsyncPending):
        def spy(self: Any, reply: Any, deliver: Any = cls.deliver) -> None:
            seen.append((self, threading.current_thread().name))
            deliver(self, reply)

        monkeypatch.setattr(cls, "deliver", spy)
    return seen


def _on_redis(h: Harness) -> bool:
    return h.app.conf.broker_url.startswith("redis")


def test_an_acall_after_a_sync_call_is_read_and_answered_on_its_own_loop(
        h: Harness, free_long: Client, deliveries: list[tuple[Any, str]]) -> None:
    ref = h.forseti.get_key(fresh("own"))

    async def main() -> list[str]:
        threading.current_thread().name = "the-loop"
        readers = []
        for i in range(5):
            assert ref.call(i) == ["echo", i]  # leaves the work free
            deliveries.clear()
            assert await ref.acall(["a", i], timeout=10) == ["echo", ["a", i]]
            readers += [name for pending, name in deliveries if isinstance(pending, AsyncPending)]
        return readers

    name = threading.current_thread().name
    try:
        readers = asyncio.run(main())
    finally:
        threading.current_thread().name = name
    # RabbitMQ: the reply thread, called back (no reads that never wait there).
    assert readers == ["the-loop" if _on_redis(h) else "forseti-client"] * 5
    assert h.forseti.aio.waiting() == 0
    ref.stop()


def test_several_acalls_of_a_loop_in_flight_are_read_by_the_reply_thread(
        h: Harness, free_long: Client, deliveries: list[tuple[Any, str]]) -> None:
    # Their answers are read beside the loop's work, on another core (row 17a's throughput).
    ref = h.forseti.get_key(fresh("several"))

    async def main() -> list[Any]:
        assert ref.call("free") == ["echo", "free"]
        deliveries.clear()
        return list(await asyncio.gather(*[ref.acall(i, timeout=10) for i in range(5)]))

    assert asyncio.run(main()) == [["echo", i] for i in range(5)]
    assert [name for pending, name in deliveries if isinstance(pending, AsyncPending)] == ["forseti-client"] * 5
    ref.stop()


def test_a_sync_call_inside_a_coroutine_while_its_loop_watches_is_answered(
        h: Harness, free_long: Client) -> None:
    # The loop holds the work only within one read: blocked in a sync call it holds nothing up.
    ref = h.forseti.get_key(fresh("blocked"))

    async def main() -> tuple[Any, Any]:
        assert ref.call("free") == ["echo", "free"]
        slow = asyncio.ensure_future(ref.acall({"sleep": 0.3}, timeout=20))
        await asyncio.sleep(0)  # its request out, the loop watching
        await asyncio.sleep(0)
        sync = ref.call("inside", timeout=20)  # the keyed process answers it after the sleep
        return sync, await slow

    assert asyncio.run(main()) == (["echo", "inside"], "slept")
    assert h.forseti.aio.waiting() == 0
    ref.stop()


def test_loops_and_sync_threads_with_the_work_free_get_each_answer_once(
        h: Harness, free_long: Client, deliveries: list[tuple[Any, str]]) -> None:
    refs = [h.forseti.get_key(fresh(f"once{i}"), args=(i,)) for i in range(3)]
    results: dict[int, Any] = {}

    async def mixed(i: int) -> list[Any]:
        out = []
        for n in range(40):
            out.append(await refs[i % 3].acall(["a", i, n]))
            if n % 4 == 0:
                out.append(refs[i % 3].call(["s", i, n]))
                out += await asyncio.gather(*[refs[k].acall(["g", i, n, k]) for k in range(3)])
        return out

    def in_thread(i: int) -> None:
        if i % 2:
            results[i] = asyncio.run(mixed(i))
        else:
            results[i] = [refs[i % 3].call(["s", i, n]) for n in range(60)]

    threads = [threading.Thread(target=in_thread, args=(i,), name=f"once-{i}") for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(1, 6, 2):
        expected: list[Any] = []
        for n in range(40):
            expected.append(["echo", ["a", i, n]])
            if n % 4 == 0:
                expected += [["echo", ["s", i, n]], *(["echo", ["g", i, n, k]] for k in range(3))]
        assert results[i] == expected
    for i in range(0, 6, 2):
        assert results[i] == [["echo", ["s", i, n]] for n in range(60)]
    counts = Counter(id(pending) for pending, _ in deliveries)
    assert counts and set(counts.values()) == {1}
    assert h.forseti.client.pending == {}
    for ref in refs:
        ref.stop()


def test_a_connection_lost_while_a_loop_watches_is_read_again_after_the_reconnection(
        h: Harness, free_long: Client) -> None:
    if not _on_redis(h):
        pytest.skip("a loop watches only Redis's connection")
    ref = h.forseti.get_key(fresh("lost"))
    consumer = free_long._loop

    async def main() -> Any:
        assert ref.call("free") == ["echo", "free"]
        before = consumer._fast
        assert before is not None
        slow = asyncio.ensure_future(ref.acall({"sleep": 0.5}, timeout=30))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert before.socket is not None
        before.socket.shutdown(socket.SHUT_RDWR)
        answer = await slow
        assert consumer._fast not in (None, before)
        return answer

    assert asyncio.run(main()) == "slept"
    assert ref.call("again") == ["echo", "again"]
    ref.stop()


@pytest.mark.parametrize("reply, end", [
    (b"*2\r\n$3\r\nkey\r\n$5\r\nhello\r\n", 24),
    (b"*2\r\n$3\r\nkey\r\n$5\r\nhello\r\n*-1\r\n", 24),
    (b"*-1\r\n", 5),
    (b"_\r\n", 3),
    (b"-ERR wrong\r\n", 12),
    (b"*2\r\n$3\r\nkey\r\n$5\r\nhel", -1),
    (b"*2\r\n$3\r\nkey\r\n$5\r\nhello\r", -1),
    (b"*2\r\n$3\r\nkey\r\n$", -1),
    (b"*2\r\n$3\r\nke", -1),
    (b"*2\r", -1),
    (b"%1\r\n+a\r\n:1\r\n", 12),
])
def test_where_a_reply_ends(reply: bytes, end: int) -> None:
    assert reply_end(reply) == end


def test_a_socket_holding_part_of_a_reply_is_not_read() -> None:
    a, b = socket.socketpair()
    try:
        assert whole_reply(a)  # nothing in: a read waits for nothing
        b.sendall(b"*2\r\n$3\r\nkey\r\n$10\r\n01234")
        assert not whole_reply(a)
        b.sendall(b"56789\r\n")
        assert whole_reply(a)
        assert a.recv(100) == b"*2\r\n$3\r\nkey\r\n$10\r\n0123456789\r\n"  # peeked, not taken
        b.sendall(b"not resp\r\n")
        assert not whole_reply(a)
        a.recv(100)
        b.close()
        assert not whole_reply(a)  # closed: the reply thread's read finds out
    finally:
        a.close()
        b.close()
