"""Settings: ``forseti_*`` Celery configuration keys, read once into one typed object.

Explicit arguments to :class:`forseti_celery.Forseti` win over ``app.conf``; every
default is defined (and documented) here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigurationError

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings:
    """Every ``forseti_*`` setting with its default (Celery conf key = ``forseti_`` + field)."""

    #: ``"module:callable"`` registered as the keyed-process name ``"default"`` (forseti's ``call``).
    call: str | None = None
    #: Worker hostnames eligible for placement; empty means every worker running the plugin.
    nodes: tuple[str, ...] = ()
    #: Restart intensity of forseti's own worker components (as forseti's ``max_retries``):
    #: more than this many crashes within :attr:`max_time` seconds stop the component.
    max_retries: int = 20
    #: Window, in seconds, for :attr:`max_retries`.
    max_time: float = 10.0
    #: Default timeout, in seconds, of ``get_key``/``search_key``/``get_metrics`` (covers a slow ``init``).
    timeout: float = 15.0
    #: Default timeout, in seconds, of ``KeyRef.call`` and ``KeyRef.stop``.
    call_timeout: float = 5.0
    #: Clients cache live refs so ``get_key`` of a known key costs no round trip; a cached ref is
    #: dropped when the process's exit event arrives or a call finds it gone.
    cache: bool = True
    #: Seconds after which a client re-sends an unanswered leader request (the leader may have died).
    retry_interval: float = 1.0
    #: Seconds between a worker's heartbeats to the rest of the cluster.
    heartbeat: float = 1.0
    #: A worker silent for this many seconds is dead: the leader frees its keys. A worker that
    #: cannot reach the broker for :attr:`fence_after` seconds kills its keyed processes first.
    node_timeout: float = 8.0
    #: Redis: the leader lease length in seconds (renewed every quarter of it). RabbitMQ: the
    #: broker heartbeat of the registry's connection, so a hung leader loses its connection (and role).
    lease: float = 5.0
    #: Keyed processes each worker forks ahead of need, waiting for a key: a new key then costs
    #: a pipe write instead of a fork and a process start. 0 forks on demand only.
    spares: int = 2
    #: Seconds a stopped keyed process gets to run ``terminate`` before it is killed.
    stop_timeout: float = 5.0
    #: Prefix of every queue, exchange and Redis key, so several clusters can share a broker.
    namespace: str = "forseti"
    #: Longest accepted key, in characters.
    max_key_length: int = 65536

    @classmethod
    def from_app(cls, conf: Any, **explicit: Any) -> Settings:
        """Read ``forseti_*`` keys from a Celery ``app.conf``; non-``None`` ``explicit`` values win."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = explicit.get(f.name)
            if value is None:
                value = conf.get(f"forseti_{f.name}")
            if value is not None:
                values[f.name] = value
        unknown = set(explicit) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigurationError(f"unknown forseti settings: {sorted(unknown)}")
        if "nodes" in values:
            values["nodes"] = tuple(values["nodes"])
        settings = cls(**values)
        settings._validate()
        return settings

    @property
    def fence_after(self) -> float:
        """Seconds without broker contact after which a worker kills its keyed processes: two
        heartbeats before the leader may declare it dead (so a key never has two processes)."""
        return self.node_timeout - 2 * self.heartbeat

    def _validate(self) -> None:
        durations = ("max_time", "timeout", "call_timeout", "retry_interval", "heartbeat", "node_timeout",
                     "lease", "stop_timeout")
        for name in durations:
            if not float(getattr(self, name)) > 0:
                raise ConfigurationError(f"forseti_{name} must be a positive number of seconds")
        if self.node_timeout <= 3 * self.heartbeat:
            raise ConfigurationError("forseti_node_timeout must exceed three heartbeats")
        if not self.namespace or not self.namespace.replace("_", "").replace("-", "").isalnum():
            raise ConfigurationError("forseti_namespace must be a non-empty [A-Za-z0-9_-] word")
        if self.max_retries < 0:
            raise ConfigurationError("forseti_max_retries must be >= 0")
        if not isinstance(self.spares, int) or self.spares < 0:
            raise ConfigurationError("forseti_spares must be an integer >= 0")


