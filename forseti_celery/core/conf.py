"""Settings: ``forseti_*`` Celery configuration keys, read once into one typed object.

Explicit arguments to :class:`forseti_celery.Forseti` win over ``app.conf``; every
default is defined (and documented) here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from difflib import get_close_matches
from typing import Any, get_type_hints

from celery.utils.log import get_logger

from .errors import ConfigurationError, InvalidArgument

logger = get_logger(__name__)

__all__ = ["MAX_TIMEOUT", "REBALANCE_POLICIES", "RESTART_POLICIES", "ZYGOTE_STARTS", "ChildConfig", "KeyPolicy",
           "Settings", "checked_timeout"]

#: The restart policies, in OTP's words: ``temporary`` never restarted, ``transient`` after an
#: abnormal end, ``permanent`` after any end but ``stop()``.
RESTART_POLICIES = ("temporary", "transient", "permanent")
#: The values of ``forseti_rebalance``: ``off`` (never move a key to a joining worker) or
#: ``on_join`` (move movable keys to it until counts differ by at most one).
REBALANCE_POLICIES = ("off", "on_join")
#: How a worker starts its zygote (``forseti_zygote``): forked from the worker, or a new
#: interpreter (``exec``) that imports the keyed processes' modules.
ZYGOTE_STARTS = ("fork", "exec")
#: The URL schemes of ``forseti_state_url`` (redis-py's ``Redis.from_url``).
STATE_URL_SCHEMES = ("redis://", "rediss://", "unix://")
#: The settings a keyed-process name may set for itself (``@forseti.keyed(name=..., idle_timeout=...)``).
POLICY_FIELDS = ("idle_timeout", "restart", "max_restarts", "restart_window")

#: Longest timeout or duration accepted, in seconds (30 days). Past it the waits overflow
#: (``threading.TIMEOUT_MAX``, ~292 years here, is where ``OverflowError`` starts) or the broker
#: refuses the request's expiry (RabbitMQ: ``value_too_large`` somewhere past 10**7 s).
MAX_TIMEOUT = 30 * 86400.0


def checked_timeout(timeout: Any, default: float | None, *, zero: bool = False) -> float | None:
    """``timeout`` in seconds as a float (``default`` for ``None``), or :class:`InvalidArgument`
    unless it is a number ``> 0`` (``>= 0`` with ``zero``) and at most :data:`MAX_TIMEOUT`."""
    if timeout is None:
        return default
    # bool is an int to Python, never a duration to a user; NaN fails every comparison.
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not (0 <= timeout if zero else 0 < timeout) or not timeout <= MAX_TIMEOUT:
        least = ">= 0" if zero else "> 0"
        raise InvalidArgument(f"timeout must be a number of seconds {least} and at most {MAX_TIMEOUT:g} "
                              f"(forseti_celery.core.conf.MAX_TIMEOUT), not {timeout!r}")
    return float(timeout)


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
    #: How the worker starts the zygote that forks its spares: ``"fork"`` (a fork of the worker,
    #: sharing its memory and state) or ``"exec"`` (a new interpreter that imports the modules
    #: of the registered keyed processes, as multiprocessing's *forkserver* does: a new key costs
    #: less CPU, the worker ~45 MiB more memory). See docs/configuration.rst.
    zygote: str = "fork"
    #: Seconds a stopped keyed process gets to run ``terminate`` before it is killed.
    stop_timeout: float = 5.0
    #: Prefix of every queue, exchange and Redis key, so several clusters can share a broker.
    namespace: str = "forseti"
    #: Longest accepted key, in characters.
    max_key_length: int = 65536
    #: Bytes a worker holds for one keyed process that has not taken them off its pipe (stopped,
    #: or in C code holding its GIL). Past it a ``call`` fails at once with ``MailboxFull`` and a
    #: ``send`` is dropped (logged); with nothing waiting, any one message is taken. 16 MiB: a
    #: process stopped for seconds under a steady stream loses nothing, while a stuck one costs
    #: its worker at most this much memory (see docs/failure-model.rst, "Mailboxes").
    mailbox_limit: int = 16 * 1024 * 1024
    #: Largest message, ``get_key`` args or reply, in bytes of encoded JSON (key and envelope
    #: included), refused at its sender with ``InvalidMessage`` before anything is queued. A worker
    #: never decodes a message's payload (its keyed process does): a MiB costs the worker's thread
    #: that heartbeats 5-20 ms of broker transport, not the ~0.1 s of decoding it cost up to 1 MiB
    #: did. What bounds it now: a mailbox (16 MiB) still takes four, a client's batch stays under
    #: RabbitMQ 4's 16 MiB, and the sender and the keyed process spend ~0.1 s per MiB encoding and
    #: decoding a list of numbers (see docs/failure-model.rst, "Message limits").
    max_message_size: int = 4 * 1024 * 1024
    #: The worker secret: a str, or a list of str to rotate it (the first signs, every one
    #: verifies). Set, every message of a worker to another or to the leader is signed
    #: (HMAC-SHA256) and a worker acts on no worker message whose signature does not verify;
    #: unset, nothing is signed or checked. Clients need it not: never give it to them (see
    #: docs/security.rst). Kept out of ``repr``; Celery masks ``*SECRET*`` keys in ``inspect conf``.
    worker_secret: tuple[str, ...] = field(default=(), repr=False)
    #: Seconds a keyed process may go without a ``call``/``send`` (or a ``keep_alive`` timer)
    #: before it is passivated: ``terminate("idle")``, its key freed. ``None``: never. Per name:
    #: ``@forseti.keyed(name=..., idle_timeout=...)``.
    idle_timeout: float | None = None
    #: What the leader does when a keyed process ends: ``"temporary"`` (never restart it),
    #: ``"transient"`` (restart it after an abnormal end) or ``"permanent"`` (after any end but
    #: ``stop()``). Per name: ``@forseti.keyed(name=..., restart=...)``.
    restart: str = "temporary"
    #: Restarts of one key allowed within :attr:`restart_window` seconds; past it the key stays down.
    max_restarts: int = 3
    #: Window, in seconds, for :attr:`max_restarts`.
    restart_window: float = 60.0
    #: Seconds a warm shutdown may spend handing its movable keyed processes over to other
    #: workers, in total for the worker; past it the rest end as before (``shutdown``).
    handoff_timeout: float = 30.0
    #: ``"off"``: keys stay where they are; ``"on_join"``: when a worker joins, the leader moves
    #: movable keys to it until counts differ by at most one (:data:`REBALANCE_POLICIES`).
    rebalance: str = "off"
    #: Keys a rebalance moves at a time (each by a handoff), so a join never stalls the cluster.
    rebalance_batch: int = 10
    #: A Redis URL (``redis://``, ``rediss://``, ``unix://``) where keyed processes store their
    #: checkpoints (``self.checkpoint()``); ``None``: checkpoints off.
    state_url: str | None = None
    #: Seconds: after a handled message, a movable keyed process checkpoints if its last
    #: checkpoint is older than this (needs :attr:`state_url`). ``None``: only ``self.checkpoint()``.
    checkpoint_every: float | None = None

    @classmethod
    def from_app(cls, conf: Any, **explicit: Any) -> Settings:
        """Read ``forseti_*`` keys from a Celery ``app.conf``; non-``None`` ``explicit`` values win.

        Logs a warning for each ``forseti_*`` key of ``conf`` that is no setting (a typo, most
        likely), naming the closest known one; raises :class:`ConfigurationError` for an unknown
        explicit name or a bad value, naming the key and the value.
        """
        cls.check(**explicit)
        _warn_unknown(conf)
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = explicit.get(f.name)
            if value is None:
                value = conf.get(f"forseti_{f.name}")
            if value is not None:
                values[f.name] = _checked(f.name, value)
        settings = cls(**values)
        if settings.checkpoint_every is not None and settings.state_url is None:
            raise ConfigurationError(
                f"forseti_checkpoint_every ({settings.checkpoint_every!r}) needs forseti_state_url "
                "(where checkpoints are stored)")
        if settings.node_timeout <= 3 * settings.heartbeat:
            raise ConfigurationError(
                f"forseti_node_timeout ({settings.node_timeout!r}) must exceed three heartbeats "
                f"(forseti_heartbeat = {settings.heartbeat!r})")
        return settings

    @classmethod
    def check(cls, **explicit: Any) -> None:
        """Check keyword arguments of :class:`~forseti_celery.Forseti` on their own (each name known,
        each value of its setting's type and range), as :meth:`from_app` checks them later."""
        unknown = sorted(set(explicit) - set(_HINTS))
        if unknown:
            hints = "".join(f" ({name}: did you mean {', '.join(close)}?)" for name in unknown
                            if (close := get_close_matches(name, _HINTS, n=1)))
            raise ConfigurationError(f"unknown forseti settings: {unknown}{hints}")
        for name, value in explicit.items():
            if value is not None:
                _checked(name, value)

    def policy(self, **overrides: Any) -> KeyPolicy:
        """The lifecycle policy of a keyed-process name: these settings, with ``overrides``
        (``idle_timeout``, ``restart``, ``max_restarts``, ``restart_window``; an
        ``idle_timeout=None`` override means never) winning. Raises :class:`ConfigurationError`
        naming the keyword and the value for an unknown keyword or a bad value."""
        values = {name: getattr(self, name) for name in POLICY_FIELDS}
        for name, value in overrides.items():
            values[name] = checked_policy(name, value)
        return KeyPolicy(**values)

    @property
    def fence_after(self) -> float:
        """Seconds without broker contact after which a worker kills its keyed processes: two
        heartbeats before the leader may declare it dead (so a key never has two processes)."""
        return self.node_timeout - 2 * self.heartbeat


@dataclass(frozen=True)
class KeyPolicy:
    """The lifecycle of one keyed-process name: passivation and restarts (:meth:`Settings.policy`).
    The pool reads :attr:`idle_timeout`, the leader the rest, through ``forseti.policy(name)``."""

    #: Seconds without a ``call``/``send`` (or ``keep_alive`` timer) before passivation; None: never.
    idle_timeout: float | None = Settings.idle_timeout
    #: ``"temporary"``, ``"transient"`` or ``"permanent"`` (:data:`RESTART_POLICIES`).
    restart: str = Settings.restart
    #: Restarts allowed within :attr:`restart_window` seconds.
    max_restarts: int = Settings.max_restarts
    #: Window, in seconds, for :attr:`max_restarts`.
    restart_window: float = Settings.restart_window


def checked_policy(name: str, value: Any) -> Any:
    """``value`` of the per-name keyword ``name`` (``idle_timeout``, ``restart``, ``max_restarts``,
    ``restart_window``) as :class:`KeyPolicy` holds it, or :class:`ConfigurationError` naming the
    keyword and the value. ``idle_timeout=None`` is a value here: never passivate."""
    if name not in POLICY_FIELDS:
        raise ConfigurationError(f"unknown keyed-process policy keyword {name!r} (known: {', '.join(POLICY_FIELDS)})")
    if value is None and name == "idle_timeout":
        return None
    try:
        return _checked(name, value)
    except ConfigurationError as exc:
        # The keyword's own name, as the user wrote it: the message of the conf key names forseti_<name>.
        raise ConfigurationError(f"keyword {name}: {exc}") from None


@dataclass(frozen=True)
class ChildConfig:
    """Every setting a worker's keyed-process pool and its keyed processes use, built once from
    :class:`Settings` (:meth:`from_settings`) and handed down as one object: settings, the pool,
    the zygote, the keyed process (which inherits it with the fork). A new per-process setting
    is a field here and a line in :meth:`from_settings`. The defaults are :class:`Settings`'."""

    #: Seconds a stopped keyed process gets to run ``terminate`` before it is killed.
    stop_timeout: float = Settings.stop_timeout
    #: Seconds without broker contact after which the keyed processes end (the lifeline).
    fence_after: float = Settings().fence_after
    #: The worker's heartbeat: the lifeline is looked at every half of it.
    heartbeat: float = Settings.heartbeat
    #: Keyed processes forked ahead of need, waiting for a key.
    spares: int = Settings.spares
    #: ``"fork"`` or ``"exec"``: how the worker starts its zygote (:data:`ZYGOTE_STARTS`).
    zygote: str = Settings.zygote
    #: Bytes the worker holds for one keyed process that has not taken them off its pipe.
    mailbox_limit: int = Settings.mailbox_limit
    #: Largest reply a keyed process sends, in bytes of encoded JSON.
    max_message_size: int = Settings.max_message_size
    #: Where keyed processes store checkpoints (a Redis URL); ``None``: off.
    state_url: str | None = Settings.state_url
    #: Seconds between automatic checkpoints after a handled message; ``None``: off.
    checkpoint_every: float | None = Settings.checkpoint_every
    #: The namespace (prefix of the checkpoint keys in Redis).
    namespace: str = Settings.namespace

    @classmethod
    def from_settings(cls, s: Settings) -> ChildConfig:
        """The per-process part of ``s``."""
        return cls(stop_timeout=s.stop_timeout, fence_after=s.fence_after, heartbeat=s.heartbeat,
                   spares=s.spares, zygote=s.zygote, mailbox_limit=s.mailbox_limit, max_message_size=s.max_message_size,
                   state_url=s.state_url, checkpoint_every=s.checkpoint_every, namespace=s.namespace)


_HINTS: dict[str, Any] = get_type_hints(Settings)
#: The least value of each integer setting.
_LEAST = {"max_retries": 0, "max_restarts": 0, "spares": 0, "max_key_length": 1, "mailbox_limit": 1,
          "max_message_size": 1024, "rebalance_batch": 1}
_WORD = re.compile(r"[A-Za-z0-9_-]+")


def _checked(name: str, value: Any) -> Any:
    """``value`` of setting ``name`` as its field holds it, or :class:`ConfigurationError`."""
    key, hint = f"forseti_{name}", _HINTS[name]
    if name in ("idle_timeout", "checkpoint_every"):
        hint = float  # None (never) is the default, and no value to check
    if hint is float:
        # bool is an int to Python, never a duration to a user.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TIMEOUT:
            raise ConfigurationError(f"{key} must be a positive number of seconds, not {value!r} "
                                     f"(at most {MAX_TIMEOUT:g}: forseti_celery.core.conf.MAX_TIMEOUT)")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < _LEAST[name]:
            raise ConfigurationError(f"{key} must be an integer >= {_LEAST[name]}, not {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigurationError(f"{key} must be True or False, not {value!r}")
        return value
    if name == "nodes":
        # A lone str would pass as a sequence of one-letter hostnames.
        if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)) \
                or not all(isinstance(v, str) and v for v in value):
            raise ConfigurationError(f"{key} must be a list of worker hostnames (str), not {value!r}")
        return tuple(value)
    if name == "worker_secret":
        secrets = [value] if isinstance(value, str) else value
        if not isinstance(secrets, (list, tuple)) or not secrets or not all(isinstance(v, str) and v for v in secrets):
            # The value itself stays out of the message: it may be a secret with a typo.
            raise ConfigurationError(f"{key} must be a non-empty str, or a non-empty list of them (rotation); got a "
                                     f"{type(value).__name__}")
        return tuple(secrets)
    if name == "restart":
        if value not in RESTART_POLICIES:
            raise ConfigurationError(f"{key} must be one of {', '.join(map(repr, RESTART_POLICIES))}, not {value!r}")
        return value
    if name == "rebalance":
        if value not in REBALANCE_POLICIES:
            raise ConfigurationError(f"{key} must be one of {', '.join(map(repr, REBALANCE_POLICIES))}, not {value!r}")
        return value
    if name == "zygote":
        if value not in ZYGOTE_STARTS:
            raise ConfigurationError(f"{key} must be one of {', '.join(map(repr, ZYGOTE_STARTS))}, not {value!r}")
        return value
    if name == "state_url":
        if not isinstance(value, str) or not value.startswith(STATE_URL_SCHEMES):
            raise ConfigurationError(f"{key} must be a Redis URL ({', '.join(STATE_URL_SCHEMES)}...), not {value!r}")
        return value
    if name == "namespace":
        if not isinstance(value, str) or not _WORD.fullmatch(value):
            raise ConfigurationError(f"{key} must be a non-empty word of [A-Za-z0-9_-], not {value!r}")
        return value
    if not isinstance(value, str) or not value:  # call: "module:callable"
        raise ConfigurationError(f"{key} must be a \"module:callable\" string, not {value!r}")
    return value


def _warn_unknown(conf: Any) -> None:
    """Warn about each ``forseti_*`` key of ``conf`` that is no setting (any case: Celery's keys
    are lower case, so ``FORSETI_SPARES`` is not read either)."""
    known = [f"forseti_{name}" for name in _HINTS]
    for key in sorted(k for k in conf.keys() if isinstance(k, str) and k.lower().startswith("forseti_")):
        if key in known:
            continue
        # Compared without the prefix every key shares, which would make any two keys look close.
        close = get_close_matches(key.lower()[len("forseti_"):], _HINTS, n=1)
        if close:
            logger.warning("forseti: unknown setting %s (did you mean forseti_%s?)", key, close[0])
        else:
            logger.warning("forseti: unknown setting %s (known: %s)", key, ", ".join(known))
