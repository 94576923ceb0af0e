"""Remote-control commands of a worker running forseti: list its keyed processes, stop one,
rebalance the cluster's movable keys (the leader).

Registered in Celery's :class:`~celery.worker.control.Panel` when this module is imported
(``forseti_celery.app`` imports it), on workers and clients alike: ``celery inspect`` and
``celery control`` check a command's name and arguments against the Panel of the process that
sends it. Every worker that builds ``Forseti(app)`` answers::

    celery -A proj inspect forseti_keys [NAME]
    celery -A proj control forseti_stop KEY [NAME] -d w1@host
    celery -A proj control forseti_rebalance [TIMEOUT] -d LEADER   # celery forseti rebalance finds it

The handlers run in the worker's main thread and only check their arguments here: the worker's
bootstep answers them (:mod:`forseti_celery.worker.control`), so a client never imports the worker.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command, inspect_command, nok, ok

from .core.errors import ForsetiError

__all__ = ["NOT_RUNNING", "forseti_keys", "forseti_rebalance", "forseti_stop", "step_of"]

NOT_RUNNING = "forseti is not running on this worker"


def step_of(state: Any) -> Any:
    """The forseti bootstep of the worker answering a command if its node runs, else ``None``
    (the bootstep sets itself on the worker as ``forseti``, as Celery's ``c.heart``)."""
    step = getattr(getattr(state.consumer, "controller", None), "forseti", None)
    return step if getattr(step, "node", None) is not None else None


def forseti_keys(state: Any, name: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """List this worker's keyed processes (key, name, pid, uptime, messages); only NAME's if given."""
    step = step_of(state)
    if step is None:
        return nok(NOT_RUNNING)  # type: ignore[no-any-return]
    return step.keys(name)  # type: ignore[no-any-return]


def forseti_stop(state: Any, key: str | None = None, name: str | None = "default", **kwargs: Any) -> dict[str, Any]:
    """Stop keyed process KEY (of NAME, default "default") on this worker; answers ok or not found."""
    # The command line sends what it was given: a missing key must be answered, not raise TypeError.
    if not key or not isinstance(key, str):
        return nok(f"usage: forseti_stop <key> [name]: a key (text) is required, got {key!r}")  # type: ignore[no-any-return]
    step = step_of(state)
    if step is None:
        return nok(NOT_RUNNING)  # type: ignore[no-any-return]
    return step.stop_key(key, name or "default")  # type: ignore[no-any-return]


def forseti_rebalance(state: Any, timeout: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Move movable keys (the leader only) until every eligible worker's count differs by at most
    one, within TIMEOUT seconds (default ``forseti_handoff_timeout``); answers what moved:
    ``ok({"namespace", "node", "moved": [{"name", "key", "source", "target"}, ...]})``."""
    seconds = _seconds(timeout)
    if seconds is False:
        return nok(f"usage: forseti_rebalance [timeout]: the timeout must be seconds > 0, got {timeout!r}")  # type: ignore[no-any-return]
    step = step_of(state)
    if step is None:
        return nok(NOT_RUNNING)  # type: ignore[no-any-return]
    node = step.node
    if not node.leader.active:
        return nok(f"not the leader: {node.hostname} does not lead namespace {node.settings.namespace!r}; "  # type: ignore[no-any-return]
                   "ask the leader (celery forseti rebalance finds it)")
    rebalance = getattr(step, "rebalance", None)
    if rebalance is None:  # a worker of a release without handoff
        return nok("this worker's forseti cannot rebalance")  # type: ignore[no-any-return]
    try:
        moved = rebalance(seconds)
    except ForsetiError as exc:
        return nok(f"{type(exc).__name__}: {exc}")  # type: ignore[no-any-return]
    return ok({"namespace": node.settings.namespace, "node": node.hostname, "moved": moved})  # type: ignore[no-any-return]


def _seconds(value: Any) -> float | bool | None:
    """``value`` as seconds > 0 (None: not given), or False if it is not such a number."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return False
    return seconds if 0 < seconds < float("inf") else False  # NaN is refused too


# Registered by call rather than as decorators: the Panel decorators are untyped.
inspect_command(signature="[name]", args=[("name", str)])(forseti_keys)
control_command(signature="<key> [name]", args=[("key", str), ("name", str)])(forseti_stop)
control_command(signature="[timeout]", args=[("timeout", float)])(forseti_rebalance)
