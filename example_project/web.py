"""The example's web app: a FastAPI app calling one keyed process per user, with the async API.

Each user has a :class:`~example_project.app.UserSession` (an ``async def`` keyed process, a
rate limiter) somewhere in the cluster; the handlers await it without a thread per request::

    uvicorn example_project.web:api          # workers as in README.md, same FORSETI_BROKER_URL

``POST /users/{user}/hits`` takes a token (429 when none is left), ``GET /users/{user}`` tells
where the user's process runs and what it counted, ``DELETE /users/{user}`` ends it, and
``POST /rooms/{room}/posts`` posts to a chat room (a sync keyed process, awaited the same way).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from starlette.requests import Request

import forseti_celery
from example_project.app import app as default_app
from forseti_celery import ForsetiTimeout, ProcessGone, RemoteError, StartError


def create_api(celery_app: Celery | None = None) -> FastAPI:
    """The web app, calling the keyed processes of ``celery_app`` (the example's app by default)."""
    app = celery_app or default_app
    api = FastAPI(title="forseti_celery example")

    @api.post("/users/{user}/hits")
    async def hit(user: str) -> dict[str, Any]:
        # Key-addressed: the user's process is created on first use, wherever the leader puts it.
        answer: dict[str, Any] = await forseti_celery.acall(user, {"op": "hit"}, name="user", app=app, timeout=10)
        if not answer["allowed"]:
            raise HTTPException(429, detail=f"{user}: rate limited")
        return answer

    @api.get("/users/{user}")
    async def stats(user: str) -> dict[str, Any]:
        ref = await forseti_celery.aget_key(user, name="user", app=app)
        stats: dict[str, Any] = await ref.acall({"op": "stats"}, timeout=10)
        return {**stats, "node": ref.node}

    @api.delete("/users/{user}")
    async def end(user: str) -> dict[str, Any]:
        ref = await forseti_celery.asearch_key(user, name="user", app=app)
        if ref is None:
            raise HTTPException(404, detail=f"{user} has no session")
        await ref.astop()
        return {"stopped": user}

    @api.post("/rooms/{room}/posts")
    async def post(room: str, user: str, text: str) -> Any:
        await forseti_celery.acall(room, {"op": "join", "user": user}, app=app, timeout=10)
        return await forseti_celery.acall(room, {"op": "post", "user": user, "text": text}, app=app, timeout=10)

    @api.exception_handler(StartError)
    async def refused(request: Request, exc: StartError) -> JSONResponse:
        return JSONResponse({"detail": exc.exc_message}, status_code=400)  # init refused the name

    @api.exception_handler(RemoteError)
    async def crashed(request: Request, exc: RemoteError) -> JSONResponse:
        return JSONResponse({"detail": f"{exc.exc_type}: {exc.exc_message}"}, status_code=500)

    @api.exception_handler(ProcessGone)
    @api.exception_handler(ForsetiTimeout)
    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    return api


#: The app ``uvicorn example_project.web:api`` serves.
api = create_api()
