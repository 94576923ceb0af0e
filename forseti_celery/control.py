"""Remote-control commands of a worker running forseti: list its keyed processes, stop one.

Registered in Celery's :class:`~celery.worker.control.Panel` when this module is imported
(``forseti_celery.app`` imports it), on workers and clients alike: ``celery inspect`` and
``celery control`` check a command's name and arguments against the Panel of the process that
sends it. Every worker that builds ``Forseti(app)`` answers::

    celery -A proj inspect forseti_keys [NAME]
    celery -A proj control forseti_stop KEY [NAME] -d w1@host

The handlers run in the worker's main thread and only check their arguments here: the worker's
bootstep answers them (:mod:`forseti_celery.worker.control`), so a client never imports the worker.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command, inspect_command, nok

__all__ = ["NOT_RUNNING", "forseti_keys", "forseti_stop", "step_of"]

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


# Registered by call rather than as decorators: the Panel decorators are untyped.
inspect_command(signature="[name]", args=[("name", str)])(forseti_keys)
control_command(signature="<key> [name]", args=[("key", str), ("name", str)])(forseti_stop)
