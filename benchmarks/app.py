"""The Celery app the benchmark's workers run (``celery -A benchmarks.app worker``).

A keyed process that echoes and counts, and a task that echoes, so the benchmark
measures forseti_celery's own overhead and Celery's, not user code. The keyed process
is also registered as ``"idle"`` (passivates after :data:`IDLE_TIMEOUT`) and as
``"transient"`` (restarted after an abnormal end) for the lifecycle rows. The broker
comes from ``FORSETI_BROKER_URL`` and the namespace from ``FORSETI_NAMESPACE``;
every ``forseti_*`` setting keeps its library default unless ``FORSETI_HEARTBEAT``,
``FORSETI_NODE_TIMEOUT``, ``FORSETI_LEASE`` or ``FORSETI_ZYGOTE`` says otherwise;
``FORSETI_WORKER_SECRET`` (set for the workers only) makes them sign their messages.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.app.backends import by_url

from benchmarks import async_process
from forseti_celery import Forseti, KeyedProcess

#: ``idle_timeout`` of the name ``"idle"`` (rows 11, 11a: a key brought back after passivation).
IDLE_TIMEOUT = 0.2
#: Extra result backend (a Redis URL) for :data:`echo_redis`, so one run can time both backends.
REDIS_BACKEND_ENV = "FORSETI_BENCH_REDIS_BACKEND"


class Echo(KeyedProcess):
    """Answers every call with its message; counts casts (``call("count")`` reads the count)."""

    def init(self, key: str, *args: Any) -> None:
        self.casts = 0

    def handle_call(self, msg: Any) -> Any:
        if msg == "count":
            return self.casts
        if msg == "pid":
            return os.getpid()
        return msg

    def handle_cast(self, msg: Any) -> None:
        self.casts += 1


def make_app(broker_url: str | None, namespace: str, redis_backend: str | None = None) -> Celery:
    """A Celery app with :class:`Echo` as forseti's ``"default"`` and the ``echo`` tasks.

    The workers and the benchmark's client build it the same way. Tasks go to a queue of the
    namespace's own, so other Celery workers on the same broker never take them.
    """
    app = Celery("benchmarks", broker=broker_url, backend="rpc://", set_as_current=False)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_default_queue=f"{namespace}.tasks",
        result_expires=300,
        forseti_namespace=namespace,
    )
    for setting in ("heartbeat", "node_timeout", "lease"):
        value = os.environ.get(f"FORSETI_{setting.upper()}")
        if value:
            app.conf[f"forseti_{setting}"] = float(value)
    app.conf.forseti_worker_secret = os.environ.get("FORSETI_WORKER_SECRET") or None
    if os.environ.get("FORSETI_ZYGOTE"):
        app.conf.forseti_zygote = os.environ["FORSETI_ZYGOTE"]
    forseti = Forseti(app)
    forseti.keyed(Echo)
    # The lifecycle rows (issue 12): a name that passivates at once, and one restarted after a crash.
    forseti.keyed(name="idle", idle_timeout=IDLE_TIMEOUT)(Echo)
    forseti.keyed(name="transient", restart="transient")(Echo)
    forseti.keyed(name=async_process.NAME)(async_process.AsyncEcho)  # rows 16, 16a (issue 14)

    @app.task(name="benchmarks.echo", shared=False)  # type: ignore[untyped-decorator]
    def echo(x: Any) -> Any:
        """Celery's own round trip, with the rpc:// result backend."""
        return x

    if redis_backend:
        backend_cls, url = by_url(redis_backend, app.loader)

        @app.task(name="benchmarks.echo_redis", shared=False, backend=backend_cls(app=app, url=url))  # type: ignore[untyped-decorator]
        def echo_redis(x: Any) -> Any:
            """Celery's own round trip, with the Redis result backend."""
            return x

    return app


app = make_app(os.environ.get("FORSETI_BROKER_URL"), os.environ.get("FORSETI_NAMESPACE", "forseti-bench"),
               os.environ.get(REDIS_BACKEND_ENV) or None)
