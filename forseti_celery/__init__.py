"""forseti_celery: one long-lived process per key across a Celery cluster.

A port of Erlang's forseti: ask for a key and get its live process, created by
the leader on the least-used worker if there is none; when the process ends,
its key is free again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery

from .app import Forseti
from .core.errors import (
    BrokerUnavailable,
    ConfigurationError,
    DuplicateWorker,
    ForsetiError,
    ForsetiTimeout,
    InvalidArgument,
    InvalidKey,
    InvalidMessage,
    MailboxFull,
    ProcessGone,
    RemoteError,
    ResourceExhausted,
    StartError,
    StateUnavailable,
    UnknownName,
)
from .core.keyref import KeyRef
from .core.process import KeyedProcess, Timer, areceive, receive, send_after, send_every

__version__ = "0.1.0"

__all__ = [
    "BrokerUnavailable",
    "ConfigurationError",
    "DuplicateWorker",
    "Forseti",
    "ForsetiError",
    "ForsetiTimeout",
    "InvalidArgument",
    "InvalidKey",
    "InvalidMessage",
    "KeyRef",
    "KeyedProcess",
    "MailboxFull",
    "ProcessGone",
    "RemoteError",
    "ResourceExhausted",
    "StartError",
    "StateUnavailable",
    "Timer",
    "UnknownName",
    "acall",
    "aget_key",
    "aget_less_used_node",
    "aget_metrics",
    "areceive",
    "asearch_key",
    "asend",
    "call",
    "get_key",
    "get_less_used_node",
    "get_metrics",
    "receive",
    "search_key",
    "send",
    "send_after",
    "send_every",
]


def get_key(key: str, args: Sequence[Any] = (), *, name: str = "default", timeout: float | None = None,
            app: Celery | None = None) -> KeyRef:
    """The live process for ``(name, key)``, created on the least-used eligible worker if there is none.

    ``args`` are passed to the process's ``init`` (or function) after the key, as
    in ``forseti:get_key/2``. Concurrent calls for one key, from anywhere, get the
    same :class:`KeyRef` and start the process once. Raises
    :class:`StartError` if ``init`` raised, :class:`UnknownName` if no worker
    knows ``name``, :class:`ForsetiTimeout` after ``timeout`` seconds (default
    ``forseti_timeout``), :class:`InvalidKey`/:class:`InvalidMessage` for bad input.
    """
    return Forseti.of(app).get_key(key, args, name=name, timeout=timeout)


def call(key: str, msg: Any, *, name: str = "default", args: Sequence[Any] = (), timeout: float | None = None,
         app: Celery | None = None) -> Any:
    """Send ``msg`` to the ``handle_call`` of ``(name, key)``'s process and return its answer,
    creating the process with ``args`` if there is none (as :func:`get_key`).

    Addressed by key, not by :class:`KeyRef`: a message is never lost to an exit the
    caller did not cause (the process passivated, returned, crashed before taking it, or
    its worker left: the key's next incarnation, created on demand, takes it), and the
    messages one client sends to one key are handled in order, across incarnations. A
    call the process had taken when it crashed is not replayed: :class:`RemoteError`.
    ``timeout`` (default ``forseti_call_timeout``) covers the whole call, creating the
    process included. Raises as :meth:`KeyRef.call` and :func:`get_key` do. See
    :doc:`/lifecycle`.
    """
    return Forseti.of(app).call(key, msg, name=name, args=args, timeout=timeout)


def send(key: str, msg: Any, *, name: str = "default", args: Sequence[Any] = (), timeout: float | None = None,
         app: Celery | None = None) -> None:
    """Deliver ``msg`` to the ``handle_cast`` (or ``receive()``) of ``(name, key)``'s process
    without waiting, creating the process with ``args`` if there is none (this waits for it,
    as :func:`get_key` does, up to ``timeout``: default ``forseti_timeout``).

    Never lost to an exit the sender did not cause, in order per client across the key's
    incarnations, as :func:`call`; a message the process had taken when it ended is not
    delivered again.
    """
    Forseti.of(app).send(key, msg, name=name, args=args, timeout=timeout)


def search_key(key: str, *, name: str = "default", timeout: float | None = None,
               app: Celery | None = None) -> KeyRef | None:
    """The live process for ``(name, key)``, or ``None``; never creates one (``forseti:search_key/1``)."""
    return Forseti.of(app).search_key(key, name=name, timeout=timeout)


def get_metrics(app: Celery | None = None, timeout: float | None = None) -> dict[str, int]:
    """Live keyed processes per eligible live worker (hostname -> count; idle workers count 0)."""
    return Forseti.of(app).get_metrics(timeout=timeout)


def get_less_used_node(app: Celery | None = None, timeout: float | None = None) -> str:
    """Hostname of the eligible worker with the fewest keyed processes (ties by hostname)."""
    return Forseti.of(app).get_less_used_node(timeout=timeout)


# -- the same, awaited: any running event loop, no thread per request (docs/asyncio.rst) -------


async def aget_key(key: str, args: Sequence[Any] = (), *, name: str = "default", timeout: float | None = None,
                   app: Celery | None = None) -> KeyRef:
    """:func:`get_key`, awaited: the same arguments, the same (equal) :class:`KeyRef`, the same errors."""
    return await Forseti.of(app).aio.get_key(key, args, name, timeout)


async def acall(key: str, msg: Any, *, name: str = "default", args: Sequence[Any] = (),
                timeout: float | None = None, app: Celery | None = None) -> Any:
    """:func:`call`, awaited: the same answer, order and errors; cancelling the awaiting task
    gives the call up (its answer, if any comes, is dropped)."""
    return await Forseti.of(app).aio.call_key(key, msg, args, name, timeout)


async def asend(key: str, msg: Any, *, name: str = "default", args: Sequence[Any] = (),
                timeout: float | None = None, app: Celery | None = None) -> None:
    """:func:`send` from a coroutine: returns once queued (awaiting only the process's creation,
    if it has none), in order with this client's other messages to the key."""
    await Forseti.of(app).asend(key, msg, name=name, args=args, timeout=timeout)


async def asearch_key(key: str, *, name: str = "default", timeout: float | None = None,
                      app: Celery | None = None) -> KeyRef | None:
    """:func:`search_key`, awaited."""
    return await Forseti.of(app).asearch_key(key, name=name, timeout=timeout)


async def aget_metrics(app: Celery | None = None, timeout: float | None = None) -> dict[str, int]:
    """:func:`get_metrics`, awaited."""
    return await Forseti.of(app).aget_metrics(timeout=timeout)


async def aget_less_used_node(app: Celery | None = None, timeout: float | None = None) -> str:
    """:func:`get_less_used_node`, awaited."""
    return await Forseti.of(app).aget_less_used_node(timeout=timeout)
