"""The ``Forseti`` extension: installs forseti_celery on a Celery app and registers keyed workers."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any, TypeVar, overload

from celery import Celery, current_app
from kombu.utils.imports import symbol_by_name

from . import control as _control  # noqa: F401  (registers the workers' inspect/control commands)
from .client import Client
from .conf import Settings
from .errors import ConfigurationError, InvalidArgument
from .keyref import KeyRef
from .protocol import Names
from .registry import RegistryStep

__all__ = ["Forseti"]

T = TypeVar("T")
#: Every Forseti of this process, oldest first (refs decoded outside any app look here).
_installed: list[weakref.ref[Forseti]] = []


class Forseti:
    """forseti_celery on one Celery app: ``forseti = Forseti(app)``.

    Installs the registry bootstep on the app's workers and keeps the keyed-process
    registrations (:meth:`keyed`). Keyword arguments are settings (see
    :class:`~forseti_celery.conf.Settings`) and win over ``forseti_*`` keys of
    ``app.conf``: ``call``, ``nodes``, ``max_retries``, ``max_time``, ….
    """

    def __init__(self, app: Celery, **settings: Any) -> None:
        self.app = app
        self._explicit = settings
        Settings.check(**settings)  # refuse unknown or invalid settings now
        self._targets: dict[str, Any] = {}
        self._client: Client | None = None
        self._client_pid = 0
        self._client_lock = threading.Lock()
        app._forseti = self
        _installed.append(weakref.ref(self))
        app.steps["worker"].add(type("RegistryStep", (RegistryStep,), {"forseti": self}))

    @classmethod
    def of(cls, app: Celery | None = None, namespace: str | None = None) -> Forseti:
        """The ``Forseti`` installed on ``app``. Without ``app``: the current Celery app's, or else
        the one installed last in this process; with ``namespace`` (a ref decoded outside any app,
        e.g. from a task result), the first of those serving that namespace. Raises
        :class:`InvalidArgument` when none serves ``namespace`` (or ``app`` serves another one):
        another app's cluster would otherwise serve a ref that is not its own."""
        if app is None:
            current: Forseti | None = getattr(current_app._get_current_object(), "_forseti", None)
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
            raise InvalidArgument(f"{app!r} serves namespace {forseti.settings.namespace!r}, "
                                  f"not {namespace!r}")
        return forseti  # type: ignore[no-any-return]

    @cached_property
    def settings(self) -> Settings:
        """The settings, read from ``app.conf`` once (on first use, after the app is configured)."""
        return Settings.from_app(self.app.conf, **self._explicit)

    @cached_property
    def names(self) -> Names:
        """Queue and exchange names of this cluster."""
        with self.app.connection_for_write() as conn:
            amqp = conn.transport.driver_type == "amqp"
        return Names(self.settings.namespace, single_active_consumer=amqp)

    # -- registrations ------------------------------------------------------------------------
    @overload
    def keyed(self, target: T) -> T: ...
    @overload
    def keyed(self, target: None = None, *, name: str = "default") -> Callable[[T], T]: ...

    def keyed(self, target: Any = None, *, name: str = "default") -> Any:
        """Register a keyed process: a :class:`~forseti_celery.KeyedProcess` subclass or a function
        whose first argument is the key. ``@forseti.keyed`` registers it as ``"default"``,
        ``@forseti.keyed(name="poller")`` under a name of its own."""
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"name must be a non-empty str, not {name!r}")

        def register(obj: T) -> T:
            if not callable(obj):
                raise InvalidArgument(f"a keyed process must be a KeyedProcess subclass or a function: {obj!r}")
            self._targets[name] = obj
            return obj

        return register(target) if target is not None else register

    def resolve(self, name: str) -> Any:
        """The registered target for ``name``, or ``None``; ``forseti_call`` serves ``"default"``."""
        target = self._targets.get(name)
        if target is None and name == "default" and self.settings.call:
            target = symbol_by_name(self.settings.call)
        return target

    def known_names(self) -> set[str]:
        """Every name this process can start."""
        return set(self._targets) | ({"default"} if self.settings.call else set())

    # -- client ----------------------------------------------------------------------------
    @property
    def client(self) -> Client:
        """This process's client (a new one after a fork)."""
        pid = os.getpid()
        if self._client is None or self._client_pid != pid:
            with self._client_lock:
                if self._client is None or self._client_pid != pid:
                    self._client = Client(self)
                    self._client_pid = pid
        return self._client

    def close(self) -> None:
        """Close this process's client (its connections and threads); the next use makes a new one."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def get_key(self, key: str, args: Sequence[Any] = (), *, name: str = "default",
                timeout: float | None = None) -> KeyRef:
        """See :func:`forseti_celery.get_key`."""
        return self.client.get_key(key, args, name, timeout)

    def search_key(self, key: str, *, name: str = "default", timeout: float | None = None) -> KeyRef | None:
        """See :func:`forseti_celery.search_key`."""
        return self.client.search_key(key, name, timeout)

    def get_metrics(self, timeout: float | None = None) -> dict[str, int]:
        """See :func:`forseti_celery.get_metrics`."""
        return self.client.get_metrics(timeout)

    def get_less_used_node(self, timeout: float | None = None) -> str:
        """See :func:`forseti_celery.get_less_used_node`."""
        return self.client.get_less_used_node(timeout)


def _namespace_of(forseti: Forseti) -> str | None:
    """The namespace ``forseti`` serves, or None when its settings are invalid: a misconfigured
    install left in this process serves nothing, and must not break the search for another."""
    try:
        return forseti.settings.namespace
    except ConfigurationError:
        return None
