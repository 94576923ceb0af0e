"""KeyRef: a reference to one live keyed process, like forseti's ``{Node, PID}``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kombu.utils.json import register_type

from . import installs
from .errors import InvalidArgument

if TYPE_CHECKING:
    from celery import Celery

    from .installs import Caller, Installed

__all__ = ["KeyRef"]


@dataclass(frozen=True)
class KeyRef:
    """The live process behind ``(name, key)``: ``node, pid = ref`` unpacks like ``{Node, PID}``.

    Immutable and hashable; two refs to the same live process are equal, also
    after a trip through a Celery task argument or result (JSON), and work on the
    other side: there they talk through the app whose ``forseti_namespace`` they
    carry (the current app's when it matches). Where no ``Forseti`` of this process
    serves that namespace, using one raises :class:`~forseti_celery.InvalidArgument`
    (another cluster never serves it).
    """

    #: Hostname of the worker running the process, e.g. ``"w1@host"``.
    node: str
    #: The keyed process's OS pid.
    pid: int
    #: The key.
    key: str
    #: The keyed-process name (``"default"`` unless registered otherwise).
    name: str = "default"
    #: The cluster (``forseti_namespace``) the process belongs to.
    namespace: str = "forseti"
    _app: Celery | None = field(default=None, compare=False, repr=False)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.node, self.pid))

    def call(self, msg: Any, timeout: float | None = None) -> Any:
        """Send ``msg`` to ``handle_call`` and return its answer.

        Raises :class:`~forseti_celery.ProcessGone` if the process has exited,
        :class:`~forseti_celery.RemoteError` if it raised (and so crashed), and
        :class:`~forseti_celery.ForsetiTimeout` after ``timeout`` seconds
        (default ``forseti_call_timeout``, 5 s).
        """
        return self._client().call(self, msg, timeout)

    def send(self, msg: Any) -> None:
        """Deliver ``msg`` to ``handle_cast`` (or ``receive()``) without waiting; ordered per client."""
        self._client().cast(self, msg)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the process (its ``terminate`` runs) and return once it has exited and its key is free."""
        self._client().stop(self, timeout)

    async def acall(self, msg: Any, timeout: float | None = None) -> Any:
        """:meth:`call`, awaited: the same answer and errors (:doc:`/asyncio`)."""
        return await self._installed().aio.call(self, msg, timeout)

    async def asend(self, msg: Any) -> None:
        """:meth:`send` from a coroutine: returns once queued, in order with this client's other messages."""
        await self._installed().aio.cast(self, msg)

    async def astop(self, timeout: float | None = None) -> None:
        """:meth:`stop`, awaited."""
        await self._installed().aio.stop(self, timeout)

    def _client(self) -> Caller:
        return self._installed().client

    def _installed(self) -> Installed:
        return installs.of(self._app, namespace=self.namespace)

    def to_json(self) -> dict[str, Any]:
        """The wire form (also what Celery's JSON serializer carries)."""
        return {"node": self.node, "pid": self.pid, "key": self.key, "name": self.name, "ns": self.namespace}

    @classmethod
    def from_json(cls, data: dict[str, Any], app: Celery | None = None) -> KeyRef:
        """Rebuild a ref from :meth:`to_json` output; :class:`~forseti_celery.InvalidArgument`
        names each field missing or of the wrong type."""
        if not isinstance(data, dict):
            raise InvalidArgument(f"a KeyRef's JSON form is an object, not {type(data).__name__}")
        values = {f: data.get(f, default) for f, (_, default) in _FIELDS.items()}
        wrong = [f"{f!r} missing" if values[f] is None else f"{f!r} is {type(values[f]).__name__}, not {kind.__name__}"
                 for f, (kind, _) in _FIELDS.items()
                 # bool is an int to Python, never a pid.
                 if not isinstance(values[f], kind) or isinstance(values[f], bool)]
        if wrong:
            raise InvalidArgument(f"not a KeyRef ({', '.join(wrong)}): {data!r:.200}")
        return cls(values["node"], values["pid"], values["key"], values["name"], values["ns"], app)


#: Fields of the JSON form: type, and default (``None``: required).
_FIELDS: dict[str, tuple[type, Any]] = {
    "node": (str, None), "pid": (int, None), "key": (str, None), "name": (str, "default"), "ns": (str, "forseti"),
}


register_type(KeyRef, "forseti_keyref", KeyRef.to_json, KeyRef.from_json)
