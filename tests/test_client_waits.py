"""A sync caller's wait for its answer (``client.requests.Pending``): alone, and across three real
workers on Redis and on RabbitMQ, with many callers at once and callers that gave up; a new
client's cache of refs, which its first request does not wait to subscribe to exits for."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from forseti_celery import Forseti, ForsetiTimeout
from forseti_celery.client.requests import Pending
from forseti_celery.core.messages import Reply
from forseti_celery.testing import wait_for

from .helpers import Harness, client_app, fresh, harness


def _reply(corr: str, value: object) -> dict[str, object]:
    return Reply(corr, value=value).to_wire()


def test_a_wait_ends_with_the_first_answer_or_the_timeout() -> None:
    pending = Pending()
    assert pending.wait(0.01) is False and pending.reply is None
    first, second = _reply("c1", 1), _reply("c1", 2)
    pending.deliver(first)
    pending.deliver(second)  # a resent request answered twice: the first answer stands
    assert pending.wait(0.01) is True and pending.wait(0) is True
    assert pending.reply is first


def test_an_answer_from_another_thread_wakes_the_waiting_caller() -> None:
    pending = Pending()
    waiting = threading.Event()
    woke: list[bool] = []

    def caller() -> None:
        waiting.set()
        woke.append(pending.wait(30))

    thread = threading.Thread(target=caller)
    thread.start()
    waiting.wait(30)
    answer = _reply("c2", "x")
    pending.deliver(answer)
    thread.join(30)
    assert woke == [True] and pending.reply is answer


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    url = request.getfixturevalue(f"{request.param}_url")
    with harness(url, tmp_path_factory.mktemp(request.param)) as h:
        yield h


def test_many_threads_calling_at_once_each_get_their_own_answer(h: Harness) -> None:
    refs = [h.forseti.get_key(fresh(f"many{i}")) for i in range(3)]
    asks = [(t, i) for t in range(16) for i in range(20)]

    def calls(t: int) -> list[object]:
        return [refs[(t + i) % 3].call(["ask", t, i]) for i in range(20)]

    with ThreadPoolExecutor(16) as pool:
        answers = [a for batch in pool.map(calls, range(16)) for a in batch]
    assert answers == [["echo", ["ask", t, i]] for t, i in asks]
    assert h.forseti.client.pending == {}
    for ref in refs:
        ref.stop()


def test_an_answer_to_a_caller_that_gave_up_is_dropped(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("gaveup"))
    with pytest.raises(ForsetiTimeout):
        ref.call({"sleep": 0.5}, timeout=0.1)
    assert h.forseti.client.pending == {}  # the caller's wait is gone with it
    # The late "slept" comes while this call waits behind it: each caller gets its own answer.
    assert ref.call("next", timeout=10) == ["echo", "next"]
    assert h.forseti.client.pending == {}
    ref.stop()


def test_a_new_client_caches_only_once_subscribed_to_exits_and_then_hears_them(h: Harness) -> None:
    # Its first request does not wait for the exits subscription (the reply thread's): an exit
    # before it is subscribed cannot leave a stale ref cached, and one after it drops the ref.
    app = client_app(h.cluster.broker_url, h.namespace)
    client = Forseti.of(app)
    try:
        ref = client.get_key(fresh("newclient"))
        wait_for(lambda: client.get_key(ref.key) is client.get_key(ref.key), 10, 0.02,
                 "the new client never cached the ref")
        os.kill(ref.pid, signal.SIGKILL)
        again = wait_for(lambda: (r := client.get_key(ref.key)) != ref and r, 10.0,
                         message="the new client kept answering the killed process")
        assert again.pid != ref.pid and again.call("get") == 0
        again.stop()
    finally:
        client.client.close()
        app.close()
