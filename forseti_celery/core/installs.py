"""The ``Forseti`` installs of this process: which one serves an app, or a namespace.

A :class:`~forseti_celery.KeyRef` decoded outside any app (a task result, a CLI argument) finds
the client that serves its namespace here, so the value in ``core`` never imports the facade that
owns the client. The facade (``forseti_celery.app``) registers each install; the worker and the
client take one as an :class:`Installed`, the part of the facade they use.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

from celery import current_app

from .errors import ConfigurationError, InvalidArgument

if TYPE_CHECKING:
    from celery import Celery

    from .conf import KeyPolicy, Settings
    from .protocol import Names

__all__ = ["AsyncCaller", "Caller", "Installed", "install", "of"]


class Caller(Protocol):
    """What a ``KeyRef`` asks of the client that serves its namespace."""

    def call(self, ref: Any, msg: Any, timeout: float | None) -> Any: ...
    def cast(self, ref: Any, msg: Any) -> None: ...
    def stop(self, ref: Any, timeout: float | None) -> None: ...


class AsyncCaller(Protocol):
    """What a ``KeyRef``'s ``acall``/``asend``/``astop`` ask of the async side of that client."""

    def call(self, ref: Any, msg: Any, timeout: float | None) -> Awaitable[Any]: ...
    def cast(self, ref: Any, msg: Any) -> Awaitable[None]: ...
    def stop(self, ref: Any, timeout: float | None) -> Awaitable[None]: ...


class Installed(Protocol):
    """forseti_celery on one Celery app, as the client, the worker and refs see it."""

    app: Celery

    @property
    def settings(self) -> Settings: ...
    @property
    def names(self) -> Names: ...
    @property
    def client(self) -> Caller: ...
    @property
    def aio(self) -> AsyncCaller: ...
    def resolve(self, name: str) -> Any: ...
    def known_names(self) -> set[str]: ...
    def policy(self, name: str) -> KeyPolicy: ...


#: Every install of this process, oldest first (refs decoded outside any app look here).
_installed: list[weakref.ref[Installed]] = []


def install(forseti: Installed) -> None:
    """Record ``forseti`` as installed on ``forseti.app`` (and as this process's newest)."""
    forseti.app._forseti = forseti
    _installed.append(weakref.ref(forseti))


def of(app: Celery | None = None, namespace: str | None = None) -> Installed:
    """The install on ``app``. Without ``app``: the current Celery app's, or else the one installed
    last in this process; with ``namespace`` (a ref decoded outside any app, e.g. from a task
    result), the first of those serving that namespace. Raises :class:`InvalidArgument` when none
    serves ``namespace`` (or ``app`` serves another one): another app's cluster would otherwise
    serve a ref that is not its own."""
    if app is None:
        current: Installed | None = getattr(current_app._get_current_object(), "_forseti", None)
        candidates = [current] + [r() for r in reversed(_installed)]
        for forseti in candidates:
            if forseti is not None and namespace in (None, _namespace_of(forseti)):
                return forseti
        if namespace is not None:
            raise InvalidArgument(f"no Forseti of namespace {namespace!r} in this process: install "
                                  f"Forseti on an app with forseti_namespace={namespace!r}")
        app = current_app._get_current_object()
    forseti = getattr(app, "_forseti", None)
    if forseti is None:
        raise ConfigurationError(f"forseti_celery is not installed on {app!r}: call Forseti(app) first")
    if namespace is not None and forseti.settings.namespace != namespace:
        raise InvalidArgument(f"{app!r} serves namespace {forseti.settings.namespace!r}, not {namespace!r}")
    return forseti  # type: ignore[no-any-return]


def _namespace_of(forseti: Installed) -> str | None:
    """The namespace ``forseti`` serves, or None when its settings are invalid: a misconfigured
    install left in this process serves nothing, and must not break the search for another."""
    try:
        return forseti.settings.namespace
    except ConfigurationError:
        return None
