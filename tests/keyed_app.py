"""The workers' app of the key-addressed tests (``celery -A tests.keyed_app worker``).

Its keyed processes record what they handle in Redis (``KA_RECORD_URL``), under the
cluster's namespace, so that what every incarnation of a key took survives it:
``<ns>:log:<key>`` each message handled, in order; ``<ns>:inc:<key>`` how many
incarnations the key has had; ``<ns>:end:<key>`` each incarnation's terminate reason.
``"ka"`` never passivates; ``"ka_idle"`` after ``KA_IDLE_TIMEOUT`` seconds (0.5).
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery

from forseti_celery import Forseti, KeyedProcess

NAMESPACE = os.environ.get("FORSETI_NAMESPACE", "forseti")
app = Celery("keyed", broker=os.environ.get("FORSETI_BROKER_URL"), backend="rpc://", set_as_current=True)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    forseti_namespace=NAMESPACE,
    task_default_queue=NAMESPACE,
    forseti_heartbeat=0.5,
    forseti_node_timeout=4.0,
    forseti_lease=2.0,
)
if "KA_STOP_TIMEOUT" in os.environ:  # a leaving worker's grace, for a test that needs a wide one
    app.conf.forseti_stop_timeout = float(os.environ["KA_STOP_TIMEOUT"])
forseti = Forseti(app)


def record_key(kind: str, key: str, namespace: str = NAMESPACE) -> str:
    """The Redis key of ``kind`` (log, inc, end) of ``key``'s processes."""
    return f"{namespace}:{kind}:{key}"


class Recorded(KeyedProcess):
    """Appends every message it handles to the key's log; a call answers who handled it."""

    def init(self, key: str, *args: Any) -> None:
        self.key = key
        self.args = list(args)
        self.db = redis.Redis.from_url(os.environ["KA_RECORD_URL"])
        self.incarnation = self.db.incr(record_key("inc", key))
        if args and args[0] == "fail":
            raise ValueError("asked to fail")

    def handle_cast(self, msg: Any) -> None:
        self.db.rpush(record_key("log", self.key), json.dumps(msg))

    def handle_call(self, msg: Any) -> Any:
        if msg == "crash":
            raise ValueError("asked to crash")
        self.db.rpush(record_key("log", self.key), json.dumps(msg))
        return {"pid": os.getpid(), "args": self.args, "incarnation": self.incarnation}

    def terminate(self, reason: str) -> None:
        self.db.rpush(record_key("end", self.key), reason)


@forseti.keyed(name="ka", idle_timeout=None)
class KeyAddressed(Recorded):
    """Never passivates."""


@forseti.keyed(name="ka_idle", idle_timeout=float(os.environ.get("KA_IDLE_TIMEOUT", "0.5")))
class KeyAddressedIdle(Recorded):
    """Passivates after ``KA_IDLE_TIMEOUT`` seconds without a message."""
