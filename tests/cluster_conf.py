"""The settings every test cluster's app shares, read from the environment the harness gives its
workers (``FORSETI_NAMESPACE``, ``FORSETI_HEARTBEAT``, ...): fast timings, one namespace per cluster.

Imports nothing of forseti_celery, so the apps of older releases' workers use it too.
"""

from __future__ import annotations

import os
from typing import Any


def cluster_conf(spares: int) -> dict[str, Any]:
    """``app.conf`` of a test cluster; ``spares`` unless ``FORSETI_SPARES`` says otherwise."""
    namespace = os.environ.get("FORSETI_NAMESPACE", "forseti")
    return {
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "forseti_namespace": namespace,
        # Tasks of one test cluster stay among its own workers when runs share a broker.
        "task_default_queue": os.environ.get("FORSETI_NAMESPACE", "celery"),
        "forseti_heartbeat": float(os.environ.get("FORSETI_HEARTBEAT", "0.5")),
        "forseti_node_timeout": float(os.environ.get("FORSETI_NODE_TIMEOUT", "4")),
        "forseti_lease": float(os.environ.get("FORSETI_LEASE", "2")),
        "forseti_spares": int(os.environ.get("FORSETI_SPARES", str(spares))),
        "forseti_zygote": os.environ.get("FORSETI_ZYGOTE", "fork"),
    }
