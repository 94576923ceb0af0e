"""kombu's Redis publish, written out: the envelope kombu pushes, sent by redis-py in one write.

A publish through kombu's ``Producer`` costs twice a bare ``LPUSH`` (124 against 55 µs, kombu 5.7):
the message dict is built and augmented in several steps, serialised by kombu's JSON encoder and
pushed through a redis-py client's command machinery. A :class:`Wire` builds the same envelope
(what the virtual ``Channel.prepare_message`` and ``_inplace_augment_message`` make of a message
of the default exchange or of a fanout exchange, on a Redis channel) from text it prepared once,
and writes the commands of a publish, the raise of its list's TTL included, in one write on a
connection of the channel's own pool, reading their answers after (one round trip).

A wire keeps the connection it took from the pool (its publisher's lock has one thread at a time
send on it): a publish is one ``sendto`` and one ``recvfrom``, where taking a connection from
redis-py's pool and giving it back costs five more system calls each time (``getpid`` twice, and
its check that nothing is left to read: ``ioctl``, ``recvfrom``, ``ioctl``) and its bookkeeping.
What that check caught, a connection the server closed while it was kept (``CLIENT KILL``, the
server's ``timeout``), shows as a connection error before any answer: the publish is sent again
once on a connection the pool checked (redis-py pings one idle past
``health_check_interval`` before a send, as before). A process forked from one holding it (a
client's, a worker's) takes one of its own: the parent's socket is never written by the child.

What it mirrors sits behind :data:`KOMBU_REDIS_WIRE` (a :class:`~forseti_celery.core.compat.Guard`); ``for_channel``
answers ``None`` with the guard off, for a channel not kombu's Redis one, or for one whose
options change the envelope (a body encoding other than base64): the publisher then goes through
kombu. ``tests/test_redis_wire.py`` pins it against kombu's own producer and consumer.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import uuid
from collections.abc import Sequence
from typing import Any

from kombu.entity import maybe_delivery_mode
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from .. import forks
from ..compat import Guard, _check_kombu_redis_declare, _missing, _version_in

__all__ = ["KEEP_AT_LEAST", "KOMBU_REDIS_WIRE", "Wire", "for_channel", "pack", "release", "ttl_ms"]


def _check() -> str | None:
    import redis
    from kombu.transport import redis as kombu_redis
    from kombu.transport.virtual import base
    from redis.connection import AbstractConnection

    return (_check_kombu_redis_declare()  # kombu 5.4-5.7, and its Redis channel's _put / _put_fanout
            or _version_in("redis-py", tuple(redis.VERSION), (5, 0), (9, 0))
            or _missing(kombu_redis.Channel, "_get_publish_topics", "_q_for_pri", "_get_message_priority")
            or _missing(base.Channel, "prepare_message", "_inplace_augment_message", "encode_body")
            or _missing(AbstractConnection, "pack_commands", "send_packed_command", "read_response", "disconnect")
            or (None if base.Channel.codecs["base64"].encode(b"\xff") == "/w==" else "kombu's base64 codec changed"))


#: kombu's Redis ``prepare_message`` + ``_inplace_augment_message`` + ``_put`` / ``_put_fanout``,
#: written out here: the envelope kombu pushes, sent with a list's TTL raise in one write on a
#: connection of the channel's pool.
KOMBU_REDIS_WIRE = Guard(
    "kombu Redis message envelope", "publishing through kombu's Producer (a slower publish)", _check,
)

#: Raise a key's TTL to ARGV[1] ms unless it already lives longer (-1: no TTL yet).
KEEP_AT_LEAST = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then return redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 0
"""
_KEEP_SHA = hashlib.sha1(KEEP_AT_LEAST.encode()).hexdigest()

Command = tuple[Any, ...]

#: Routing keys whose last :meth:`Wire.keep_at_least` a wire keeps (a client's node queues).
_KEEPS = 256


def pack(commands: Sequence[Command]) -> bytes:
    """``commands`` in the Redis protocol, as redis-py's ``pack_commands`` with its default encoder
    (UTF-8) writes them, in one ``bytes``: a fifth of its time (3 against 15 µs for a push and its
    TTL raise). Arguments are ``bytes``, ``str`` or ``int`` (what :class:`Wire` makes)."""
    out: list[bytes] = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            if type(arg) is str:
                arg = arg.encode()
            elif type(arg) is int:
                arg = b"%d" % arg
            elif not isinstance(arg, (bytes, bytearray)):
                raise TypeError(f"cannot pack {type(arg).__name__}")
            out += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(out)


def ttl_ms(ttl: float) -> int:
    """A TTL of ``ttl`` seconds in whole milliseconds, at least one (rounded up)."""
    return max(1, math.ceil(ttl * 1000))


class Wire:
    """The publishes of one kombu Redis channel, as kombu's ``_put`` / ``_put_fanout`` send them."""

    def __init__(self, channel: Any, content_type: str, content_encoding: str) -> None:
        self._channel = channel
        self._pool = channel.client.connection_pool
        self._prefix = channel.global_keyprefix
        priority = channel.default_priority  # a publish's priority 0 is the channel's default
        self._suffix = channel._q_for_pri("", channel._get_message_priority({"properties": {"priority": priority}}))
        self._head = b'{"body": "'
        self._middle = (f'", "content-encoding": {json.dumps(content_encoding)}, '
                        f'"content-type": {json.dumps(content_type)}, "headers": ')
        self._tail = (f', "priority": {json.dumps(priority)}, "body_encoding": "base64", '
                      f'"delivery_tag": "{uuid.uuid4().hex}.')
        # kombu's delivery tag is a uuid4 per message; its consumers need it unique only (the key
        # of an unacked message), which a uuid per wire and a count are.
        self._tags = itertools.count()
        self._modes: dict[str | None, str] = {}
        self._keeps: dict[str, tuple[float, Command]] = {}  # the last keep_at_least of each routing key
        # redis-py's default encoder (what pack writes): redis-py's own packing otherwise
        kw = getattr(self._pool, "connection_kwargs", None)
        self._utf8 = isinstance(kw, dict) and (kw.get("encoding", "utf-8"), kw.get("encoding_errors", "strict")) == (
            "utf-8", "strict")
        self._conn: Any = None  # the pool's connection it keeps, taken in the process of fork count _forks_at
        self._forks_at = -1

    def routes(self, exchange: Any, routing_key: str) -> bool:
        """Whether this wire sends a publish to ``exchange`` as kombu would: to a list (the default
        exchange, a queue without kombu's own expiry) or to a fanout exchange's channels."""
        if exchange.name:
            return bool(exchange.type == "fanout")
        return routing_key not in self._channel._expires

    def push(self, exchange: Any, routing_key: str, body: bytes, headers: dict[str, str] | None) -> list[Command]:
        """The commands kombu sends for a publish of ``body`` (:meth:`routes` true)."""
        mode = self._modes.get(exchange.delivery_mode)
        if mode is None:
            mode = self._modes[exchange.delivery_mode] = json.dumps(maybe_delivery_mode(exchange.delivery_mode))
        message = b"".join((
            self._head, base64.b64encode(body),
            (f'{self._middle}{json.dumps(headers) if headers else "{}"}, "properties": {{"delivery_mode": {mode}, '
             f'"delivery_info": {{"exchange": {json.dumps(exchange.name)}, "routing_key": {json.dumps(routing_key)}}}'
             f'{self._tail}{next(self._tags)}"}}}}').encode(),
        ))
        if not exchange.name:
            return [("LPUSH", f"{self._prefix}{routing_key}{self._suffix}", message)]
        return [("PUBLISH", self._prefix + topic, message)
                for topic in self._channel._get_publish_topics(exchange.name, routing_key)]

    def keep_at_least(self, routing_key: str, ttl: float) -> Command:
        """The command raising the TTL of the list of ``routing_key`` to ``ttl`` seconds unless
        it lives longer (:data:`KEEP_AT_LEAST`, cached by the server: sent by its digest)."""
        kept = self._keeps.get(routing_key)
        if kept is not None and kept[0] == ttl:  # a node queue's TTL is always the same
            return kept[1]
        command = ("EVALSHA", _KEEP_SHA, 1, self._prefix + routing_key, ttl_ms(ttl))
        if kept is not None or len(self._keeps) < _KEEPS:
            self._keeps[routing_key] = (ttl, command)
        return command

    def send(self, commands: Sequence[Command]) -> None:
        """Send ``commands`` in one write, in order, and read their answers; raises redis-py's
        errors (a lost connection: any of them may have been applied or not). One thread at a
        time (its publisher's lock)."""
        conn, kept = self._conn, True
        if conn is None or self._forks_at != forks.count():  # none yet, or the parent's (left alone)
            conn, kept = self._take(), False
        errors: list[tuple[Command, ResponseError]] = []
        answered = 0
        try:
            conn.send_packed_command([pack(commands)] if self._utf8 else conn.pack_commands(commands))
            for command in commands:
                try:
                    conn.read_response()
                except ResponseError as exc:  # answered: the next answers follow on the connection
                    errors.append((command, exc))
                answered += 1
        except RedisConnectionError:
            self._drop(conn)
            if not kept or answered:
                raise
            # Kept, and closed by the server meanwhile (nothing answered): what the pool's check
            # would have found before the send. Once more, on a connection the pool checks.
            self.send(commands)
            return
        except BaseException:
            self._drop(conn)
            raise
        unknown = [c for c, exc in errors if isinstance(exc, NoScriptError)]
        if len(unknown) != len(errors):
            raise next(exc for _, exc in errors if not isinstance(exc, NoScriptError))
        if unknown:  # a server that never ran the script (or flushed it): EVAL caches it
            self.send([("EVAL", KEEP_AT_LEAST, *args) for _, _, *args in unknown])

    def _take(self) -> Any:
        """A connection from the pool (checked by it: connected, nothing left to read), kept."""
        self._conn = None
        conn = self._pool.get_connection()  # after a fork: the pool's own, a new one (redis-py's pid check)
        self._conn, self._forks_at = conn, forks.count()
        return conn

    def _drop(self, conn: Any) -> None:
        """``conn`` failed (or is given back): closed and returned to the pool, not kept."""
        self._conn = None
        conn.disconnect()
        self._pool.release(conn)

    def close(self) -> None:
        """Give the kept connection back to the pool (which the channel's close disconnects)."""
        conn, self._conn = self._conn, None
        if conn is not None and self._forks_at == forks.count():
            self._pool.release(conn)


def for_channel(channel: Any, content_type: str, content_encoding: str) -> Wire | None:
    """The :class:`Wire` of kombu Redis ``channel`` (one per channel), or ``None``: publish
    through kombu (the guard off, another transport's channel, or an envelope not the one mirrored)."""
    if not hasattr(channel, "_put_fanout") or not KOMBU_REDIS_WIRE.ok():
        return None
    wire: Wire | None = getattr(channel, "_forseti_wire", None)
    if wire is not None or channel.body_encoding != "base64":
        return wire
    wire = channel._forseti_wire = Wire(channel, content_type, content_encoding)
    return wire


def release(channel: Any) -> None:
    """Give the connection kept by the :class:`Wire` of ``channel``, if any, back to its pool."""
    wire = getattr(channel, "_forseti_wire", None)
    if isinstance(wire, Wire):
        wire.close()
