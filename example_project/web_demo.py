"""The demo's web section: ``example_project.web``'s FastAPI app served by uvicorn (in a thread
of the demo), and browsed over HTTP by an async client, each request awaiting a user's keyed process."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any

import httpx
import uvicorn

import forseti_celery
from example_project.app import app
from example_project.web import api
from forseti_celery.testing import wait_for

USERS = ("ada", "grace", "linus")
#: Requests each user sends at once: more than a session's burst (10), so some are refused.
HITS = 15


def tour(say: Any, expect: Any) -> None:
    """Serve the app on a free port, browse it, stop it: ``say`` prints, ``expect`` checks."""
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 20.0, 0.02, "uvicorn did not start")
        port = server.servers[0].sockets[0].getsockname()[1]
        say(f"uvicorn serves example_project.web:api on http://127.0.0.1:{port}")
        asyncio.run(_browse(f"http://127.0.0.1:{port}", say, expect))
    finally:
        server.should_exit = True
        thread.join(10.0)


async def _browse(url: str, say: Any, expect: Any) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=20.0) as web:
        t0 = time.perf_counter()
        replies = await asyncio.gather(*(web.post(f"/users/{u}/hits") for u in USERS for _ in range(HITS)))
        ms = (time.perf_counter() - t0) * 1000
        say(f"{len(replies)} requests at once ({HITS} per user), each awaiting forseti_celery.acall: {ms:.0f} ms")
        for i, user in enumerate(USERS):
            codes = Counter(r.status_code for r in replies[i * HITS:(i + 1) * HITS])
            stats = (await web.get(f"/users/{user}")).json()
            expect(set(codes) <= {200, 429} and codes[429] >= 1, f"{user}: unexpected answers {dict(codes)}")
            expect(stats["allowed"] == codes[200], f"{user}: the session counted {stats}, the web saw {codes}")
            say(f"  POST /users/{user}/hits x{HITS} -> {codes[200]} x 200, {codes[429]} x 429 (rate limited); "
                f"GET -> {stats['node']} pid {stats['pid']}")
        posted = (await web.post("/rooms/lobby/posts", params={"user": "ada", "text": "from the web"})).json()
        say(f"POST /rooms/lobby/posts -> {posted} (a sync keyed process, awaited alike)")
        bad = await web.post("/users/Not%20A%20Name/hits")
        expect(bad.status_code == 400, f"a bad user name answered {bad.status_code}")
        say(f"POST /users/Not A Name/hits -> {bad.status_code} {bad.json()['detail']!r} (StartError)")
        for user in USERS:
            expect((await web.delete(f"/users/{user}")).status_code == 200, f"DELETE /users/{user} failed")
        gone = [await forseti_celery.asearch_key(u, name="user", app=app) for u in USERS]
        expect(gone == [None] * len(USERS), f"sessions left after DELETE: {gone}")
        say(f"DELETE /users/... x{len(USERS)} -> stopped (their refill tasks cancelled after terminate)")
