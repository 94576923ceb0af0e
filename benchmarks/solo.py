"""The solo-pool Celery column of ``make bench``: a plain Celery app (no forseti) whose ``echo``
task runs in a ``celery worker -P solo`` (the task runs in the worker's own process: no pool
hand-off), beside the prefork workers' task. Its queue is the run's own (``FORSETI_BENCH_SOLO_QUEUE``).

The worker runs this module's :data:`app` (``celery -A benchmarks.solo worker -P solo``); the
benchmark's process builds the same app with :func:`make_app` and starts the worker with :class:`Solo`.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.app.backends import by_url

QUEUE_ENV = "FORSETI_BENCH_SOLO_QUEUE"
REDIS_BACKEND_ENV = "FORSETI_BENCH_REDIS_BACKEND"


def make_app(broker_url: str | None, queue: str, redis_backend: str | None = None) -> Celery:
    """A Celery app with ``echo`` (rpc:// results) and, given a Redis, ``echo_redis``."""
    app = Celery("benchmarks-solo", broker=broker_url, backend="rpc://", set_as_current=False)
    app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
                    task_default_queue=queue, result_expires=300)

    @app.task(name="benchmarks.solo.echo", shared=False)  # type: ignore[untyped-decorator]
    def echo(x: Any) -> Any:
        return x

    if redis_backend:
        backend_cls, url = by_url(redis_backend, app.loader)

        @app.task(name="benchmarks.solo.echo_redis", shared=False, backend=backend_cls(app=app, url=url))  # type: ignore[untyped-decorator]
        def echo_redis(x: Any) -> Any:
            return x

    return app


app = make_app(os.environ.get("FORSETI_BROKER_URL"), os.environ.get(QUEUE_ENV, "forseti-bench-solo"),
               os.environ.get(REDIS_BACKEND_ENV) or None)


class Solo:
    """One ``celery worker -P solo`` of :data:`app` on the run's broker, and a client app."""

    def __init__(self, url: str, redis_backend: str | None, cwd: str, tag: str) -> None:
        from forseti_celery.testing import WorkerProcess, short_hostname

        self.queue = f"forseti-bench-solo.{uuid.uuid4().hex[:8]}"
        env = {QUEUE_ENV: self.queue, REDIS_BACKEND_ENV: redis_backend or ""}
        self.worker = WorkerProcess("benchmarks.solo", f"solo-{tag}@{short_hostname()}", url,
                                    tempfile.mkdtemp(prefix="forseti-bench-solo-"), pool="solo", env=env,
                                    cwd=cwd)
        self.app = make_app(url, self.queue, redis_backend)

    @property
    def backends(self) -> dict[str, str]:
        """Result backend -> name of the task storing its results there."""
        names = {"rpc://": "benchmarks.solo.echo"}
        if "benchmarks.solo.echo_redis" in self.app.tasks:
            names["redis"] = "benchmarks.solo.echo_redis"
        return names

    def start(self, timeout: float = 60.0) -> None:
        self.worker.start()
        for name in self.backends.values():  # answered once the worker consumes its queue
            self.app.tasks[name].delay(0).get(timeout=timeout)

    def caller(self, name: str) -> Callable[[int], Any]:
        task = self.app.tasks[name]
        return lambda i: task.delay(i).get(timeout=10)

    def stop(self) -> None:
        try:
            self.worker.stop()
        finally:
            self.app.close()
