"""Remote-control commands of a worker running forseti: list its keyed processes, stop one.

Registered in Celery's :class:`~celery.worker.control.Panel` when this module is
imported (``forseti_celery.app`` imports it), so every worker that builds
``Forseti(app)`` answers::

    celery -A proj inspect forseti_keys [NAME]
    celery -A proj control forseti_stop KEY [NAME] -d w1@host

Handlers run in the worker's main thread: they read the registry's snapshot and
publish one message, and never wait on a keyed process.
"""

from __future__ import annotations

import time
from typing import Any

from celery.worker.control import control_command, inspect_command, nok, ok

from . import protocol as p
from .children import Child
from .errors import BrokerUnavailable
from .registry import Node, RegistryStep

__all__ = ["describe", "forseti_keys", "forseti_stop", "node_of"]

NOT_RUNNING = "forseti is not running on this worker"


def node_of(state: Any) -> Node | None:
    """The registry :class:`~forseti_celery.registry.Node` of the worker answering a command, if running."""
    controller = getattr(state.consumer, "controller", None)
    steps = getattr(getattr(controller, "blueprint", None), "steps", None) or {}
    for step in steps.values():
        if isinstance(step, RegistryStep):
            return step.node
    return None


def describe(child: Child, now: float) -> dict[str, Any]:
    """One keyed process as ``forseti_keys`` lists it (``uptime`` in seconds since it was given its key)."""
    return {
        "key": child.key,
        "name": child.name,
        "pid": child.pid,
        "uptime": round(max(0.0, now - child.started_at), 3),
        "messages": child.messages,
        "started": child.started,  # False while its init runs
    }


def forseti_keys(state: Any, name: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """List this worker's keyed processes (key, name, pid, uptime, messages); only NAME's if given."""
    node = node_of(state)
    if node is None:
        return nok(NOT_RUNNING)  # type: ignore[no-any-return]
    now = time.time()
    keys = [describe(c, now) for c in node.children.snapshot() if name is None or c.name == name]
    keys.sort(key=lambda d: (d["name"], d["key"]))
    # Workers of every namespace on the broker answer a broadcast: the namespace tells them apart.
    return {"namespace": node.settings.namespace, "keys": keys}


def forseti_stop(state: Any, key: str | None = None, name: str | None = "default", **kwargs: Any) -> dict[str, Any]:
    """Stop keyed process KEY (of NAME, default "default") on this worker; answers ok or not found."""
    # The command line sends what it was given: a missing key must be answered, not raise TypeError.
    if not key or not isinstance(key, str):
        return nok(f"usage: forseti_stop <key> [name]: a key (text) is required, got {key!r}")  # type: ignore[no-any-return]
    name = name or "default"
    node = node_of(state)
    if node is None:
        return nok(NOT_RUNNING)  # type: ignore[no-any-return]
    child = next((c for c in node.children.snapshot() if c.key == key and c.name == name), None)
    if child is None:
        return nok(f"not found: no keyed process {key!r} ({name}) on {node.hostname}")  # type: ignore[no-any-return]
    # Only the registry's consumer thread writes to a child's pipe: hand the stop to it through
    # this worker's own queue. The pid fences it to this very process; its exit frees the key.
    stop = {"t": p.STOP, "n": name, "k": key, "p": child.pid, "reason": "stop"}
    try:
        node.publisher.publish(node.names.exchange, node.names.node_routing_key(node.hostname), [stop])
    except BrokerUnavailable as exc:
        return nok(str(exc))  # type: ignore[no-any-return]
    return ok({"node": node.hostname, "key": key, "name": name, "pid": child.pid})  # type: ignore[no-any-return]


# Registered by call rather than as decorators: the Panel decorators are untyped.
inspect_command(signature="[name]", args=[("name", str)])(forseti_keys)
control_command(signature="<key> [name]", args=[("key", str), ("name", str)])(forseti_stop)
