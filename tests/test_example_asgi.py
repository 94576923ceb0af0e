"""example_project's FastAPI app (example_project/web.py) driven through its ASGI interface
(httpx's ASGI transport: no server, no socket) against real workers of the example's Celery
app, both brokers: one async keyed process per user, awaited with the async client API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from example_project.web import create_api
from tests.helpers import Harness, fresh, harness


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    url: str = request.getfixturevalue(f"{request.param}_url")
    with harness(url, tmp_path_factory.mktemp(f"asgi-{request.param}"), n=2, app="example_project.app") as cluster:
        yield cluster


def _client(h: Harness) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_api(h.app)), base_url="http://example")


@pytest.mark.asyncio
async def test_the_web_app_rate_limits_each_user_in_the_users_own_keyed_process(h: Harness) -> None:
    users = [fresh("u").replace("-", "") for _ in range(3)]
    async with _client(h) as web:
        # 15 requests at once per user, against a burst of 10 (refilled 5 a second).
        replies = await asyncio.gather(*(web.post(f"/users/{u}/hits") for u in users for _ in range(15)))
        for i, u in enumerate(users):
            codes = [r.status_code for r in replies[i * 15:(i + 1) * 15]]
            assert set(codes) <= {200, 429} and 10 <= codes.count(200) < 15, (u, codes)
            stats = (await web.get(f"/users/{u}")).json()
            assert stats["user"] == u and stats["allowed"] == codes.count(200)
            assert stats["allowed"] + stats["refused"] == 15
            assert stats["node"] in set(await h.forseti.aget_metrics())
        pids = {(await web.get(f"/users/{u}")).json()["pid"] for u in users}
        assert len(pids) == 3  # a process each
        for u in users:
            assert (await web.delete(f"/users/{u}")).json() == {"stopped": u}
            assert await h.forseti.asearch_key(u, name="user") is None
        assert (await web.delete(f"/users/{users[0]}")).status_code == 404


@pytest.mark.asyncio
async def test_the_web_app_answers_a_refused_start_400_and_awaits_a_sync_keyed_process_alike(h: Harness) -> None:
    async with _client(h) as web:
        bad = await web.post("/users/Not%20A%20Name/hits")
        assert bad.status_code == 400 and "bad user name" in bad.json()["detail"]
        room = fresh("room")
        posted = await web.post(f"/rooms/{room}/posts", params={"user": "ann", "text": "hi"})
        assert posted.status_code == 200 and posted.json() == {"seq": 1}
