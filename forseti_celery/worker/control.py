"""What a worker answers to forseti's remote-control commands: its keyed processes, and the
stop of one. The commands themselves (names, arguments) are declared in
:mod:`forseti_celery.control`; the worker's bootstep answers them with these functions
(``forseti_rebalance`` with its ``rebalance``: the leader's rebalancer, :mod:`.rebalance`).

They run in the worker's main thread: they read the pool's snapshot and publish one message, and
never wait on a keyed process.
"""

from __future__ import annotations

import time
from typing import Any

from celery.worker.control import nok, ok

from ..core.errors import BrokerUnavailable
from ..core.messages import Stop
from .node import Node
from .pool.children import Child

__all__ = ["describe", "keys", "stop_key"]


def describe(child: Child, now: float) -> dict[str, Any]:
    """One keyed process as ``forseti_keys`` lists it (``uptime`` in seconds since it was given its
    key; ``restarts``, times the leader restarted its key)."""
    return {
        "key": child.key,
        "name": child.name,
        "pid": child.pid,
        "uptime": round(max(0.0, now - child.started_at), 3),
        "messages": child.messages,
        "started": child.started,  # False while its init runs
        "restarts": child.restarts,  # times the leader restarted its key (its restart policy)
    }


def keys(node: Node, name: str | None) -> dict[str, Any]:
    """This worker's keyed processes (only ``name``'s if given), sorted by name and key."""
    now = time.time()
    keys = [describe(c, now) for c in node.children.snapshot() if name is None or c.name == name]
    keys.sort(key=lambda d: (d["name"], d["key"]))
    # Workers of every namespace on the broker answer a broadcast: the namespace tells them apart.
    return {"namespace": node.settings.namespace, "keys": keys}


def stop_key(node: Node, key: str, name: str) -> dict[str, Any]:
    """Stop this worker's process of ``(name, key)``: ``ok`` with its pid, or ``nok`` not found."""
    child = next((c for c in node.children.snapshot() if c.key == key and c.name == name), None)
    if child is None:
        return nok(f"not found: no keyed process {key!r} ({name}) on {node.hostname}")  # type: ignore[no-any-return]
    # Only the registry's consumer thread writes to a child's pipe: hand the stop to it through
    # this worker's own queue. The pid fences it to this very process; its exit frees the key.
    stop = Stop(name, key, child.pid, "stop").to_wire()
    try:
        node.publisher.publish(node.names.exchange, node.names.node_routing_key(node.hostname), [stop])
    except BrokerUnavailable as exc:
        return nok(str(exc))  # type: ignore[no-any-return]
    return ok({"node": node.hostname, "key": key, "name": name, "pid": child.pid})  # type: ignore[no-any-return]
