"""The Celery app of tests/test_mixed_version.py: imports only the public API, which the released
(flat) package and today's layered one both have, so old and new workers run this one module.

Prints which ``forseti_celery`` it imported, so a test can prove a worker runs the code it meant.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

import forseti_celery
from forseti_celery import Forseti, KeyedProcess
from tests.cluster_conf import cluster_conf

app = Celery("mixed", broker=os.environ.get("FORSETI_BROKER_URL"), set_as_current=True)
app.conf.update(cluster_conf(spares=1))
forseti = Forseti(app)
print(f"mixed_app: forseti_celery from {os.path.dirname(forseti_celery.__file__ or '')}", flush=True)


@forseti.keyed
class Counter(KeyedProcess):
    """Holds a number: cast "inc" adds one; calls "get" and "pid" answer, anything else is echoed."""

    def init(self, key: str, start: int = 0, *rest: Any) -> None:
        self.value = start

    def handle_call(self, msg: Any) -> Any:
        if msg == "get":
            return self.value
        if msg == "pid":
            return os.getpid()
        return ["echo", msg]

    def handle_cast(self, msg: Any) -> None:
        if msg == "inc":
            self.value += 1
