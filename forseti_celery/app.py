"""The ``Forseti`` extension: installs forseti_celery on a Celery app and registers keyed workers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from functools import cached_property
from types import EllipsisType
from typing import Any, TypeVar, cast, overload

from celery import Celery
from kombu.utils.imports import symbol_by_name

from . import control as _control  # noqa: F401  (registers the inspect/control commands)
from .client.aio import AsyncClient
from .client.client import Client
from .core import forks, installs, process, transport
from .core.conf import KeyPolicy, Settings, checked_policy
from .core.errors import InvalidArgument
from .core.keyref import KeyRef
from .core.protocol import Names

__all__ = ["Forseti"]

T = TypeVar("T")
#: The worker bootstep (it finds this install as ``app._forseti``).
WORKER_STEP = "forseti_celery.worker.step:RegistryStep"


class Forseti:
    """forseti_celery on one Celery app: ``forseti = Forseti(app)``.

    Installs the registry bootstep on the app's workers and keeps the keyed-process
    registrations (:meth:`keyed`). Keyword arguments are settings (see
    :class:`~forseti_celery.core.conf.Settings`) and win over ``forseti_*`` keys of
    ``app.conf``: ``call``, ``nodes``, ``max_retries``, ``max_time``, ….
    """

    def __init__(self, app: Celery, **settings: Any) -> None:
        self.app = app
        self._explicit = settings
        Settings.check(**settings)  # refuse unknown or invalid settings now
        self._targets: dict[str, Any] = {}
        #: The policy keywords given to :meth:`keyed`, per name (checked; conf fills in the rest).
        self._policies: dict[str, dict[str, Any]] = {}
        self._client: Client | None = None
        self._aio: AsyncClient | None = None
        self._client_forks = -1  # forks.count() when the client was made
        self._client_lock = threading.Lock()
        installs.install(self)
        # By name: the worker side is imported only where a worker builds its blueprint.
        app.steps["worker"].add(WORKER_STEP)

    @classmethod
    def of(cls, app: Celery | None = None, namespace: str | None = None) -> Forseti:
        """The ``Forseti`` installed on ``app``. Without ``app``: the current Celery app's, or else
        the one installed last in this process; with ``namespace`` (a ref decoded outside any app,
        e.g. from a task result), the first of those serving that namespace. Raises
        :class:`InvalidArgument` when none serves ``namespace`` (or ``app`` serves another one):
        another app's cluster would otherwise serve a ref that is not its own."""
        return cast(Forseti, installs.of(app, namespace))

    @cached_property
    def settings(self) -> Settings:
        """The settings, read from ``app.conf`` once (on first use, after the app is configured)."""
        return Settings.from_app(self.app.conf, **self._explicit)

    @cached_property
    def names(self) -> Names:
        """Queue and exchange names of this cluster."""
        with self.app.connection_for_write() as conn:
            amqp = transport.for_connection(conn).single_active_consumer
        return Names(self.settings.namespace, single_active_consumer=amqp)

    # -- registrations ------------------------------------------------------------------------
    @overload
    def keyed(self, target: T) -> T: ...
    @overload
    def keyed(self, target: None = None, *, name: str = "default",
              idle_timeout: float | EllipsisType | None = ..., restart: str | EllipsisType = ...,
              max_restarts: int | EllipsisType = ...,
              restart_window: float | EllipsisType = ...) -> Callable[[T], T]: ...

    def keyed(self, target: Any = None, *, name: str = "default",
              idle_timeout: float | EllipsisType | None = ..., restart: str | EllipsisType = ...,
              max_restarts: int | EllipsisType = ..., restart_window: float | EllipsisType = ...) -> Any:
        """Register a keyed process: a :class:`~forseti_celery.KeyedProcess` subclass or a function
        whose first argument is the key. ``@forseti.keyed`` registers it as ``"default"``,
        ``@forseti.keyed(name="poller")`` under a name of its own.

        ``idle_timeout``, ``restart``, ``max_restarts`` and ``restart_window`` set this name's
        lifecycle (:meth:`policy`) and win over the ``forseti_*`` settings of the same name; one
        left out is the setting's; ``idle_timeout=None`` is never, whatever the conf says. A bad
        value raises :class:`~forseti_celery.ConfigurationError` here, naming the keyword."""
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"name must be a non-empty str, not {name!r}")
        given = {"idle_timeout": idle_timeout, "restart": restart, "max_restarts": max_restarts,
                 "restart_window": restart_window}
        policy = {k: checked_policy(k, v) for k, v in given.items() if v is not ...}

        def register(obj: T) -> T:
            if not callable(obj):
                raise InvalidArgument(f"a keyed process must be a KeyedProcess subclass or a function: {obj!r}")
            self._targets[name] = obj
            self._policies[name] = policy
            process.is_async(obj)  # remembered now, before any fork (see is_async)
            return obj

        return register(target) if target is not None else register

    def policy(self, name: str) -> KeyPolicy:
        """The lifecycle policy of keyed-process name ``name``: the keywords it was registered
        with (:meth:`keyed`) over the ``forseti_idle_timeout``, ``forseti_restart``,
        ``forseti_max_restarts`` and ``forseti_restart_window`` settings (the settings alone for
        a name registered without them, or served through ``forseti_call``)."""
        return self.settings.policy(**self._policies.get(name, {}))

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
        at = forks.count()  # not os.getpid(): a system call on every request
        if self._client is None or self._client_forks != at:
            with self._client_lock:
                if self._client is None or self._client_forks != at:
                    self._client = Client(self)
                    self._client_forks = at
        return self._client

    @property
    def aio(self) -> AsyncClient:
        """The async side of :attr:`client` (a new one with each new client: after a fork)."""
        client = self.client
        aio = self._aio
        if aio is None or aio.client is not client:
            aio = self._aio = AsyncClient(client)
        return aio

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

    def call(self, key: str, msg: Any, *, name: str = "default", args: Sequence[Any] = (),
             timeout: float | None = None) -> Any:
        """See :func:`forseti_celery.call`."""
        return self.client.call_key(key, msg, args, name, timeout)

    def send(self, key: str, msg: Any, *, name: str = "default", args: Sequence[Any] = (),
             timeout: float | None = None) -> None:
        """See :func:`forseti_celery.send`."""
        self.client.cast_key(key, msg, args, name, timeout)

    def search_key(self, key: str, *, name: str = "default", timeout: float | None = None) -> KeyRef | None:
        """See :func:`forseti_celery.search_key`."""
        return self.client.search_key(key, name, timeout)

    def get_metrics(self, timeout: float | None = None) -> dict[str, int]:
        """See :func:`forseti_celery.get_metrics`."""
        return self.client.get_metrics(timeout)

    def get_less_used_node(self, timeout: float | None = None) -> str:
        """See :func:`forseti_celery.get_less_used_node`."""
        return self.client.get_less_used_node(timeout)

    # -- the same, awaited (docs/asyncio.rst) ----------------------------------------------------
    async def aget_key(self, key: str, args: Sequence[Any] = (), *, name: str = "default",
                       timeout: float | None = None) -> KeyRef:
        """See :func:`forseti_celery.aget_key`."""
        return await self.aio.get_key(key, args, name, timeout)

    async def acall(self, key: str, msg: Any, *, name: str = "default", args: Sequence[Any] = (),
                    timeout: float | None = None) -> Any:
        """See :func:`forseti_celery.acall`."""
        return await self.aio.call_key(key, msg, args, name, timeout)

    async def asend(self, key: str, msg: Any, *, name: str = "default", args: Sequence[Any] = (),
                    timeout: float | None = None) -> None:
        """See :func:`forseti_celery.asend`."""
        await self.aio.cast_key(key, msg, args, name, timeout)

    async def asearch_key(self, key: str, *, name: str = "default", timeout: float | None = None) -> KeyRef | None:
        """See :func:`forseti_celery.asearch_key`."""
        return await self.aio.search_key(key, name, timeout)

    async def aget_metrics(self, timeout: float | None = None) -> dict[str, int]:
        """See :func:`forseti_celery.aget_metrics`."""
        return await self.aio.get_metrics(timeout)

    async def aget_less_used_node(self, timeout: float | None = None) -> str:
        """See :func:`forseti_celery.aget_less_used_node`."""
        return await self.aio.get_less_used_node(timeout)
