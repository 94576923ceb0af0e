"""A new client's second request reads its own answer (issue 15, row 3): its first answer,
read by the reply thread while connecting, leaves the reads free (``Baton.release``), on Redis
(while the exits' subscription is still being confirmed) and on RabbitMQ, with real workers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from forseti_celery.client.client import Client
from forseti_celery.client.requests import Pending
from forseti_celery.core import baton as baton_module
from forseti_celery.core.baton import Baton
from forseti_celery.testing import wait_for

from .helpers import Harness, fresh, harness


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    url = request.getfixturevalue(f"{request.param}_url")
    with harness(url, tmp_path_factory.mktemp(f"second-{request.param}")) as h:
        yield h


def test_a_new_clients_second_request_finds_the_reads_free_and_reads_its_own_answer(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [fresh("second-a"), fresh("second-b")]
    for key in keys:
        h.forseti.get_key(key)
    # The role stays free until taken: the test does not race the loop thread taking it back.
    monkeypatch.setattr(baton_module, "LINGER", 60.0)
    delivered: list[str] = []
    deliver = Pending.deliver

    def spy(self: Pending, reply: Any) -> None:
        delivered.append(threading.current_thread().name)
        deliver(self, reply)

    monkeypatch.setattr(Pending, "deliver", spy)
    client = Client(h.forseti.client.forseti)
    try:
        client.get_key(keys[0], (), "default", None)  # connects; read by whoever could
        baton = client._loop._baton
        assert baton is not None
        wait_for(lambda: baton._holder == "free", 10, 0.01,
                 lambda: f"the reads were never left free after the first answer ({baton._holder})")
        delivered.clear()
        client.get_key(keys[1], (), "default", None)
        assert delivered == [threading.current_thread().name]
    finally:
        client.close()


def test_the_loop_thread_releases_the_role_free_or_to_the_caller_waiting_for_it() -> None:
    baton = Baton()
    try:
        baton.enable(True)
        baton.release()  # nobody waits: free, taken by the next caller without the loop thread
        assert baton.take(0.0) is True
        baton.give_back(False)
        baton.park(float("inf"), threading.Event())  # the loop thread takes it back after LINGER
        assert baton._holder == "loop"
        got: list[bool] = []
        caller = threading.Thread(target=lambda: got.append(baton.take(float("inf"))))
        caller.start()
        wait_for(lambda: baton.wanted, 10, 0.001, "the caller never asked for the role")
        baton.release()  # a caller waits for it: handed over
        caller.join(10)
        assert got == [True] and baton._holder == "caller"
    finally:
        baton.close()
