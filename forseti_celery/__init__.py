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
    UnknownName,
)
from .core.keyref import KeyRef
from .core.process import KeyedProcess, receive

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
    "UnknownName",
    "get_key",
    "get_less_used_node",
    "get_metrics",
    "receive",
    "search_key",
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
