"""The workers' app of the handoff rows (``celery -A benchmarks.handoff_app worker``): one movable
keyed process, ``"movable"``, a counter whose state (its count) moves with its key.

The broker comes from ``FORSETI_BROKER_URL``, the namespace from ``FORSETI_NAMESPACE``; every
``forseti_*`` setting keeps its library default (``forseti_rebalance`` is ``off``: the rows ask
for the rebalance they time).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from forseti_celery import Forseti, KeyedProcess


class Movable(KeyedProcess):
    """Counts the messages it is sent; ``snapshot`` makes it movable."""

    def init(self, key: str, *args: Any) -> None:
        self.n = 0

    def handle_call(self, msg: Any) -> Any:
        self.n += 1
        return self.n

    def handle_cast(self, msg: Any) -> None:
        self.n += 1

    def snapshot(self) -> Any:
        return {"n": self.n}

    def restore(self, state: Any) -> None:
        self.n = state["n"]


def make_app(broker_url: str | None, namespace: str) -> Celery:
    """The app of the workers and of the benchmark's client alike."""
    app = Celery("bench-handoff", broker=broker_url, backend="rpc://", set_as_current=False)
    app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
                    task_default_queue=f"{namespace}.tasks", forseti_namespace=namespace)
    Forseti(app).keyed(name="movable")(Movable)
    return app


app = make_app(os.environ.get("FORSETI_BROKER_URL"), os.environ.get("FORSETI_NAMESPACE", "forseti-bench-handoff"))
