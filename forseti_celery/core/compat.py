"""Every use of a private API of kombu, billiard, redis-py or CPython, one function each.

Each sits behind a :class:`Guard`: checked on first use against the library versions it was
written for (and the names it touches), and when the check fails the function takes a plain
path through the library's public API instead (slower, same guarantees), after one warning.
``tests/test_compat.py`` holds a contract test per use: it fails when a library changes the
behaviour relied on here, before the version range below is widened. docs/design.rst
("Library internals we rely on") lists them.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from celery.utils.log import get_logger

logger = get_logger(__name__)

__all__ = [
    "BILLIARD_BOOTSTRAP",
    "GUARDS",
    "KOMBU_REDIS_DECLARE",
    "KOMBU_REDIS_PUBLISH",
    "PY_AMQP_READ",
    "REDIS_LOCK_TOKEN",
    "THREADING_DANGLING",
    "Guard",
    "billiard_child_exit",
    "billiard_child_start",
    "forget_dead_threads",
    "py_amqp_read_ahead_allowed",
    "redis_declare_needed",
    "redis_declaring_on_channel_client",
    "redis_lock_forget",
    "redis_lock_held",
    "redis_publish_pipeline",
    "reuse_redis_client",
]


class Guard:
    """One use of a library's internals: allowed while :meth:`ok`.

    ``check()`` returns why the installed library is not the one the use was written for, or
    ``None``; it runs once, on first use (importing the library at forseti's import would cost
    every client). The failure is logged once, as a warning naming the fallback.
    """

    def __init__(self, name: str, fallback: str, check: Callable[[], str | None]) -> None:
        self.name = name
        self.fallback = fallback
        self._check = check
        self._ok: bool | None = None
        self._lock = threading.Lock()

    def ok(self) -> bool:
        """True when the internal path may be taken."""
        if self._ok is None:
            with self._lock:
                if self._ok is None:
                    try:
                        reason = self._check()
                    except Exception as exc:  # a check that cannot run is a failed check
                        reason = repr(exc)
                    if reason is not None:
                        logger.warning("forseti: %s: %s; %s", self.name, reason, self.fallback)
                    self._ok = reason is None
        return self._ok

    @contextlib.contextmanager
    def forced(self, ok: bool) -> Iterator[None]:
        """Take (``True``) or refuse (``False``) the internal path in this block (tests)."""
        saved, self._ok = self._ok, ok
        try:
            yield
        finally:
            self._ok = saved


def _version_in(name: str, version: tuple[int, ...], low: tuple[int, int], high: tuple[int, int]) -> str | None:
    if low <= version[:2] < high:
        return None
    return (f"{name} {'.'.join(map(str, version))} is outside {low[0]}.{low[1]}"
            f"-{high[0]}.{high[1] - 1}, the versions this was written for")


def _missing(obj: Any, *names: str) -> str | None:
    absent = [n for n in names if not hasattr(obj, n)]
    return f"{getattr(obj, '__name__', obj)!s} has no {', '.join(absent)}" if absent else None


# -- kombu's Redis channel: one client per channel, one pipeline per batch ------------------------

def _check_kombu_redis() -> str | None:
    import kombu
    from kombu.transport import redis as kombu_redis
    from redis.client import Pipeline

    return (_version_in("kombu", tuple(kombu.VERSION[:3]), (5, 4), (5, 8))
            or _missing(kombu_redis.Channel, "conn_or_acquire", "_create_client", "client", "_put")
            or _missing(Pipeline, "pipeline", "execute"))


#: kombu's Redis ``Channel.conn_or_acquire`` replaced per channel (see :func:`reuse_redis_client`).
KOMBU_REDIS_PUBLISH = Guard(
    "kombu Redis publish pipeline", "publishing through kombu's own path (one round trip per message)",
    _check_kombu_redis,
)


def reuse_redis_client(channel: Any) -> bool:
    """Make kombu's Redis ``channel`` publish through one redis-py client of its own, and through
    the pipeline of a :func:`redis_publish_pipeline` block while one is open. True if it does.

    kombu's Redis channel builds a new ``redis.Redis`` object for every message it publishes
    (``conn_or_acquire``), a third of the cost of a small publish (185 -> 120 µs, kombu 5.7). The
    client object holds no connection of its own (it borrows one from the channel's pool per
    command), so one per channel is as safe across reconnections as one per message. It is the
    channel's own ``client`` (on the pool kombu connected to ``PING`` the broker as it made the
    channel), so a new publisher's first publish opens no second connection: only for a channel that
    never consumes (kombu pins that client's connection to a consumer's ``BRPOP``), which is every
    channel this is called for (publishers'). Any other channel (RabbitMQ), or the guard off: left
    alone, False.
    """
    if getattr(channel, "_forseti_client", None) is not None:
        return True
    if not hasattr(channel, "_create_client") or not KOMBU_REDIS_PUBLISH.ok():
        return False
    cached = channel._forseti_client = channel.client
    channel._forseti_pipe = None  # set while a redis_publish_pipeline block is open

    @contextlib.contextmanager
    def conn_or_acquire(client: Any = None) -> Iterator[Any]:  # kombu's signature
        yield client or channel._forseti_pipe or cached

    channel.conn_or_acquire = conn_or_acquire
    return True


@contextlib.contextmanager
def redis_publish_pipeline(channel: Any) -> Iterator[Any | None]:
    """What kombu publishes on Redis ``channel`` in this block goes out in one round trip, in
    order: yields the pipeline (to queue commands of one's own after a publish), run at the end
    of the block. Yields ``None`` when the guard is off: kombu then sends each publish at once.

    kombu's ``_put`` opens a pipeline of its own for a queue with an expiry (``x-expires``), and
    a pipeline opened from ours is a new one, run at once, ahead of what ours holds: the order
    the block promises would silently break. So a pipeline kombu opens here is ours: its
    ``execute`` sends everything queued so far (an extra round trip, never a reordering).
    """
    if not reuse_redis_client(channel):
        yield None
        return
    pipe = channel._forseti_client.pipeline(transaction=False)
    pipe.pipeline = lambda transaction=True, shard_hint=None: _Joined(pipe)
    channel._forseti_pipe = pipe
    try:
        yield pipe
        pipe.execute()
    finally:
        channel._forseti_pipe = None


class _Joined:
    """``with pipe.pipeline() as p`` inside a batch: ``p`` is the batch's pipeline, whose reset on
    leaving the block (redis-py's ``__exit__``) would drop what the batch still holds."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def __enter__(self) -> Any:
        return self._pipe

    def __exit__(self, *exc: object) -> None:
        return None


# -- kombu's Redis channel: what declaring a queue does -----------------------------------------

def _check_kombu_redis_declare() -> str | None:
    import kombu
    from kombu.transport import redis as kombu_redis
    from kombu.transport.virtual import base

    return (_version_in("kombu", tuple(kombu.VERSION[:3]), (5, 4), (5, 8))
            or _missing(kombu_redis.Channel, "_new_queue", "_size", "_queue_bind", "_put", "_put_fanout")
            or _missing(base.Channel, "queue_declare", "queue_bind"))


#: kombu's Redis ``queue_declare``: for a queue of the default exchange it only counts the list's
#: messages (``_size``, on a connection of its own) and remembers ``auto_delete``, which the channel's
#: close reads for fanout queues only; a push to the list needs no declaration (see
#: :func:`redis_declare_needed`).
KOMBU_REDIS_DECLARE = Guard(
    "kombu Redis queue declaration", "declaring every queue through kombu (a connection and a round trip "
    "more before a client's first request)", _check_kombu_redis_declare,
)


def redis_declare_needed(queue: Any, consumer: bool) -> bool:
    """Whether kombu's Redis channel must declare ``queue`` (a kombu ``Queue``) before a consumer
    reads it (``consumer``) or a publisher pushes to it: always with the guard off; otherwise only
    for a consumer of a queue bound to a named exchange (a fanout subscription: the channel keeps
    its binding and subscribes to it), or a publisher to one bound to a named exchange other than
    a fanout (routed through kombu's binding table; forseti has none).

    A queue of the default exchange is a plain list to kombu's Redis transport: a publish pushes
    to the list its routing key names (``_put``), a consumer pops it, and declaring it only asks
    ``LLEN`` (on a second connection of the channel's) and notes ``auto_delete``, which the
    channel's close reads for fanout queues only (a list is never deleted by it). A publish to a
    fanout exchange is a ``PUBLISH`` to its channel (``_put_fanout``), bindings unread.
    """
    if not KOMBU_REDIS_DECLARE.ok():
        return True
    exchanges = [b.exchange for b in getattr(queue, "bindings", None) or ()] + [queue.exchange]
    named = [e for e in exchanges if e is not None and e.name]
    return bool(named) if consumer else any(e.type != "fanout" for e in named)


@contextlib.contextmanager
def redis_declaring_on_channel_client(channel: Any) -> Iterator[None]:
    """In this block, what kombu's Redis ``channel`` sends for declarations goes through the
    channel's own ``client``, on the connection kombu opened to ``PING`` the broker, instead of a
    client of a second pool (a second connection): only while no read is pending on that client
    (kombu pins its connection to a consumer's first ``BRPOP``), so before a consumer reads. A
    publisher's channel (:func:`reuse_redis_client`), any other channel, or the guard off: as is.
    """
    if (not KOMBU_REDIS_DECLARE.ok() or not hasattr(channel, "_create_client")
            or "conn_or_acquire" in vars(channel) or getattr(channel.client, "connection", None) is not None):
        yield
        return
    client = channel.client

    @contextlib.contextmanager
    def conn_or_acquire(given: Any = None) -> Iterator[Any]:  # kombu's signature
        yield given or client

    channel.conn_or_acquire = conn_or_acquire
    try:
        yield
    finally:
        del channel.conn_or_acquire


# -- redis-py's Lock: the token it holds --------------------------------------------------------

def _check_redis_lock() -> str | None:
    import redis

    return _version_in("redis-py", tuple(redis.VERSION), (5, 0), (9, 0))


#: redis-py ``Lock.local.token``: whether this lock object holds the lock, without a round trip.
REDIS_LOCK_TOKEN = Guard(
    "redis-py Lock token", "asking Redis whether the lease is held (Lock.owned: one round trip per poll)",
    _check_redis_lock,
)


def redis_lock_held(lock: Any) -> bool:
    """Whether redis-py ``lock`` (acquired by this object) holds its token: read locally, or
    asked of Redis with the guard off (which also answers False once the lease has expired)."""
    if REDIS_LOCK_TOKEN.ok():
        return lock.local.token is not None
    return bool(lock.owned())


def redis_lock_forget(lock: Any) -> None:
    """Make ``lock`` forget its token (the lease was lost: extending or releasing it would only
    fail). With the guard off, nothing: :func:`redis_lock_held` asks Redis, which knows."""
    if REDIS_LOCK_TOKEN.ok():
        lock.local.token = None


# -- billiard: a forked process that skips the parent's after-fork hooks ---------------------

def _check_billiard() -> str | None:
    import billiard
    from billiard import process, util

    return (_version_in("billiard", tuple(billiard.VERSION[:3]), (4, 0), (5, 0))
            or _missing(process, "_children", "_set_current_process")
            or _missing(util, "_finalizer_registry", "_exit_function"))


#: billiard ``process._children`` / ``_set_current_process``, ``util._finalizer_registry`` /
#: ``_exit_function``: what ``Process._bootstrap`` does in a new process, minus the after-fork hooks.
BILLIARD_BOOTSTRAP = Guard(
    "billiard process bootstrap", "starting keyed processes through billiard's own _bootstrap "
    "(runs the worker's after-fork hooks)", _check_billiard,
)


def billiard_child_start(process: Any) -> bool:
    """In a newly forked process: make ``process`` the current billiard process with no children
    and none of the parent's finalizers, as billiard's ``_bootstrap`` does. False with the guard
    off: the caller runs billiard's own ``_bootstrap`` instead."""
    if not BILLIARD_BOOTSTRAP.ok():
        return False
    from billiard import process as bp
    from billiard import util

    bp._children = set()
    bp._set_current_process(process)
    util._finalizer_registry.clear()
    return True


def billiard_child_exit() -> None:
    """At the end of a process started by :func:`billiard_child_start`: billiard's exit handler
    (finalizers, children)."""
    if not BILLIARD_BOOTSTRAP.ok():
        return
    from billiard import util

    util._exit_function()


# -- py-amqp's TCP transport: how a frame is read ------------------------------------------------

def _check_py_amqp_read() -> str | None:
    import amqp
    from amqp import transport

    return (_version_in("py-amqp", tuple(amqp.VERSION[:3]), (5, 0), (5, 5))
            or _missing(transport.TCPTransport, "_read", "read_frame", "_setup_transport", "having_timeout")
            or _missing(transport.TCPTransport("127.0.0.1"), "_read_buffer", "raise_on_initial_eintr"))


#: py-amqp ``TCPTransport._read`` (``_read_buffer``, ``_quick_recv``) and ``having_timeout``, replaced per
#: consumer connection by :func:`forseti_celery.core.transport.amqp.buffer_reads`: a frame's three reads
#: served by one ``recv``, the read's timeout polled for instead of set on the socket.
PY_AMQP_READ = Guard(
    "py-amqp frame reads", "reading each frame in py-amqp's three exact reads (a slower consume)",
    _check_py_amqp_read,
)


def py_amqp_read_ahead_allowed(transport: Any) -> bool:
    """Whether :func:`~forseti_celery.core.transport.amqp.buffer_reads` may replace the reads of
    py-amqp ``transport``: a plain TCP one (not TLS), connected, with the guard on."""
    from amqp.transport import TCPTransport

    return (type(transport) is TCPTransport and getattr(transport, "_quick_recv", None) is not None
            and PY_AMQP_READ.ok())


# -- CPython's threading: the Thread objects a fork leaves behind ---------------------------

def _check_threading() -> str | None:
    if sys.version_info >= (3, 15):
        return f"Python {sys.version_info[0]}.{sys.version_info[1]} is newer than 3.14"
    if not isinstance(getattr(threading, "_dangling", None), weakref.WeakSet):
        return "threading._dangling is not a WeakSet"
    return None


#: CPython ``threading._dangling``: the weak set of every Thread object ``os.fork`` walks.
THREADING_DANGLING = Guard(
    "threading._dangling", "the forked processes copy the pages of the dead Thread objects", _check_threading,
)


def forget_dead_threads() -> None:
    """In a forked process that forks again: drop the parent's dead Thread objects, which
    ``os.fork`` would otherwise reset in every child (writing, and so copying, their pages)."""
    if THREADING_DANGLING.ok():
        threading._dangling.clear()  # type: ignore[attr-defined]


#: Every guard, for the docs and the contract tests.
GUARDS = (KOMBU_REDIS_PUBLISH, KOMBU_REDIS_DECLARE, REDIS_LOCK_TOKEN, BILLIARD_BOOTSTRAP, THREADING_DANGLING,
          PY_AMQP_READ)
