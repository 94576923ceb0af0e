"""An app written like the README's quickstart: its broker and its namespace named in its code.

The fixture's workers must use the fixture's broker anyway, and its client this namespace.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from forseti_celery import Forseti, KeyedProcess

#: The "real" cluster's broker: a Redis db no test session claims (see tests/conftest.py).
BROKER_URL = "redis://127.0.0.1:6379/8"
NAMESPACE = "hardcoded-ns"

app = Celery("hardcoded", broker=BROKER_URL)
app.conf.update(
    broker_connection_retry_on_startup=True,
    forseti_namespace=NAMESPACE,
    # Its tasks stay among its own workers on a broker other test runs share (RabbitMQ).
    task_default_queue=NAMESPACE,
    forseti_heartbeat=0.5,
    forseti_node_timeout=4,
    forseti_lease=2,
)
forseti = Forseti(app, spares=1)


@forseti.keyed
class Counter(KeyedProcess):
    """Holds a number: casts add to it, any call answers it."""

    def init(self, key: str, start: int = 0) -> None:
        self.value = start

    def handle_call(self, msg: Any) -> Any:
        return self.value

    def handle_cast(self, msg: Any) -> None:
        self.value += msg
