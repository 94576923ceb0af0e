"""Redis: a consumer's reads without kombu's per-message machinery (issue 15), behind a guard.

kombu's Redis channel consumes a list with one ``BRPOP`` per message, through its event loop,
and builds a ``Message`` for each; a profile gave that cycle some 40 % of a worker's time. Here
the same commands go out on the same kind of connections: one ``BRPOP`` over every list queue
(and kombu's priority sub-lists, ``name + sep + step``, so what kombu published with a priority
is read too), its keys rotated after each pop as kombu's round robin does (a flooded list cannot
starve the others); the fanout queues (kombu's pub/sub topics) on a ``PSUBSCRIBE`` connection,
polled beside it, connected by a thread of its own once the first ``BRPOP`` is out (a new client's
first answer waits for no subscription: :attr:`RedisConsumer.subscribed` says when the fanouts
are heard). A message
is kombu's JSON envelope, decoded into a :class:`Delivery` (what ``ConsumerLoop`` and a worker's
admission read of a kombu message); one that is not an envelope is logged and skipped. Only
kombu's plain ``redis`` channel over TCP or a Unix socket takes it (the guard
:data:`KOMBU_REDIS_CONSUME`); any other (TLS, Sentinel), or the guard off: kombu's own.
"""

from __future__ import annotations

import binascii
import json
import select
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
from celery.utils.log import get_logger

from ..compat import Guard, _missing, _version_in

logger = get_logger(__name__)

__all__ = ["KOMBU_REDIS_CONSUME", "Delivery", "RedisConsumer", "envelope", "open_consumer"]


def _check() -> str | None:
    import kombu
    from kombu.transport import redis as kombu_redis

    return (_version_in("kombu", tuple(kombu.VERSION[:3]), (5, 4), (5, 8))
            or _version_in("redis-py", tuple(redis.VERSION), (6, 1), (9, 0))
            or _missing(kombu_redis.Channel, "async_pool", "global_keyprefix", "sep", "priority_steps",
                        "_q_for_pri", "_fanout_queues", "_get_subscribe_topics",
                        "health_check_interval")
            or _missing(redis.Connection, "send_command", "pack_command", "send_packed_command", "read_response",
                        "can_read")
            or _missing(select, "poll"))


#: kombu's Redis channel's names (its pool, key prefixes, priority sub-lists, fanout topics) and
#: redis-py's connection socket, read to consume without kombu's event loop.
KOMBU_REDIS_CONSUME = Guard(
    "kombu Redis consume loop", "consuming through kombu's own event loop (a kombu Message per message)", _check,
)


class Delivery:
    """A broker message as ``ConsumerLoop`` hands it on (the parts of a kombu ``Message`` read:
    :meth:`~forseti_celery.core.signing.Signer.admit` reads ``headers``, ``body``, ``delivery_info``)."""

    __slots__ = ("body", "delivery_info", "headers", "properties")

    def __init__(self, body: bytes, headers: dict[str, Any], properties: dict[str, Any],
                 delivery_info: dict[str, Any]) -> None:
        self.body = body
        self.headers = headers
        self.properties = properties
        self.delivery_info = delivery_info


def envelope(raw: bytes | str) -> Delivery:
    """kombu's Redis envelope (JSON; the body base64 as kombu encodes it, or plain text) decoded;
    raises ``ValueError`` when ``raw`` is not one."""
    payload = json.loads(raw)
    if not isinstance(payload, dict):
        raise ValueError("not a kombu envelope")
    properties = payload.get("properties") or {}
    headers = payload.get("headers") or {}
    body = payload.get("body") or ""
    if not isinstance(properties, dict) or not isinstance(headers, dict) or not isinstance(body, str):
        raise ValueError("not a kombu envelope")
    encoding = properties.get("body_encoding")
    if encoding == "base64":
        data = binascii.a2b_base64(body)  # a binascii.Error is a ValueError
    elif encoding:
        raise ValueError(f"unknown body encoding {encoding!r}")
    else:
        data = body.encode("utf-8", "surrogatepass")
    info = properties.get("delivery_info")
    return Delivery(data, headers, properties, info if isinstance(info, dict) else {})


def open_consumer(channel: Any, queues: Iterable[Any], deliver: Callable[[Delivery], None]) -> RedisConsumer | None:
    """A :class:`RedisConsumer` of ``queues`` (declared on ``channel`` already) on kombu's Redis
    ``channel``'s connections, or ``None``: the guard is off, or the channel is not kombu's plain
    one over TCP or a Unix socket (TLS, Sentinel), which kombu consumes itself."""
    if not KOMBU_REDIS_CONSUME.ok():
        return None
    from kombu.transport import redis as kombu_redis

    if type(channel) is not kombu_redis.Channel or issubclass(channel.async_pool.connection_class,
                                                               redis.SSLConnection):
        return None
    return RedisConsumer(channel, channel.async_pool, queues, deliver)


class RedisConsumer:
    """What kombu's Redis channel reads for a consumer of ``queues``, read by the thread calling
    :meth:`drain` (every method is that thread's). No acknowledgements: nothing is kept in kombu's
    unacked hash (its ``no_ack``)."""

    def __init__(self, channel: Any, pool: Any, queues: Iterable[Any], deliver: Callable[[Delivery], None]) -> None:
        self.channel = channel
        self._pool = pool
        self._deliver = deliver
        self._prefix: str = channel.global_keyprefix
        self._timeout = channel.brpop_timeout
        self._stale = channel.brpop_timeout + channel.health_check_interval
        self._lists: list[str] = []  # in the order of the next BRPOP's keys (rotated as kombu does)
        self._brpop: list[bytes] | None = None  # the next BRPOP's command, packed
        self._fanouts: dict[str, list[str]] = {}  # queue -> its (prefixed) topics
        self._topics: dict[bytes, str] = {}  # topic -> queue
        self._pubsub: Any = None
        self._unsent: list[str] = []  # topics to PSUBSCRIBE once the BRPOP is out
        self._unconfirmed: set[bytes] = set()  # topics PSUBSCRIBEd, their confirmation not read yet
        self._subscribed_at = 0.0  # the last PSUBSCRIBE went out
        self._connecting: threading.Thread | None = None  # connects the pub/sub (its first PSUBSCRIBE)
        self._connect_error: BaseException | None = None
        self._conn = pool.get_connection()  # the one kombu pinged the broker with, if still idle
        self._sent_at: float | None = None  # a BRPOP is out since
        self._poll = select.poll()
        self._fds: dict[int, Callable[[], None]] = {}
        for queue in queues:
            self.add_queue(queue)

    def wake_on(self, fd: int, clear: Callable[[], None]) -> None:
        """Poll ``fd`` beside the connections: when readable it ends :meth:`drain`'s wait
        (``clear()`` empties it): a client's caller asks for the loop's work so."""
        self._poll.register(fd, select.POLLIN)
        self._fds[fd] = clear

    @property
    def socket(self) -> Any:
        """The socket of the ``BRPOP`` connection (the lists' messages come on it), or None."""
        conn = self._conn
        return None if conn is None else conn._sock

    @property
    def popping(self) -> bool:
        """A ``BRPOP`` is out (its answer not read yet)."""
        return self._sent_at is not None

    def consuming_from(self, name: str) -> bool:
        return name in self._fanouts or name in self._lists

    @property
    def subscribed(self) -> bool:
        """Every fanout's subscription is confirmed by Redis: what is published to it from now on
        is read. (The lists are read from the start: what waits in them stays there.)"""
        return not self._unsent and not self._unconfirmed

    def add_queue(self, queue: Any) -> None:
        """Read ``queue`` too (declared on the channel already): the next ``BRPOP`` (the one out
        waits up to ``brpop_timeout``, as kombu's does), or its fanout subscription with the next
        :meth:`drain`, once its ``BRPOP`` is out."""
        name = queue.name
        if self.consuming_from(name):
            return
        if name not in self.channel._fanout_queues:
            self._lists.append(name)
            self._brpop = None
            return
        topics = [self._prefix + t for t in self.channel._get_subscribe_topics(name)]
        self._fanouts[name] = topics
        self._topics.update((t.encode(), name) for t in topics)
        self._unsent.extend(topics)

    def _subscribe(self) -> None:
        """``PSUBSCRIBE`` the topics added since the last; the first time, on a thread that connects
        the pub/sub while this one reads the lists."""
        topics, self._unsent = self._unsent, []
        self._unconfirmed.update(t.encode() for t in topics)
        self._subscribed_at = time.monotonic()
        if self._pubsub is not None:
            self._pubsub.psubscribe(*topics)
            self._register(self._pubsub.connection, self._read_fanouts)
            return
        self._pubsub = redis.client.PubSub(self._pool)
        self._connecting = threading.Thread(target=self._connect, args=(topics,), name="forseti-psubscribe",
                                            daemon=True)
        self._connecting.start()

    def _connect(self, topics: list[str]) -> None:  # the connecting thread's, alone on the pub/sub
        try:
            self._pubsub.psubscribe(*topics)
        except BaseException as exc:  # raised on the reading thread (_connected)
            self._connect_error = exc

    def _connected(self, wait: bool) -> bool:
        """Whether the pub/sub's connection is made and polled (``wait``: once it is)."""
        thread = self._connecting
        if thread is None:
            return True
        if not wait and thread.is_alive():
            return False
        thread.join(self._stale)
        if thread.is_alive():
            raise redis.ConnectionError("no pub/sub connection: connecting hangs")
        self._connecting = None
        error, self._connect_error = self._connect_error, None
        if error is not None:
            raise error
        self._register(self._pubsub.connection, self._read_fanouts)
        return True

    def cancel_queue(self, name: str) -> None:
        """Stop reading queue ``name`` (a ``BRPOP`` out still takes what it finds, as kombu's)."""
        if name in self._lists:
            self._lists.remove(name)
            self._brpop = None
        topics = self._fanouts.pop(name, [])
        for t in topics:
            self._topics.pop(t.encode(), None)
        sent = [t for t in topics if t not in self._unsent]
        self._unsent = [t for t in self._unsent if t not in topics]
        if sent:
            self._connected(wait=True)
            self._unconfirmed.difference_update(t.encode() for t in sent)
            self._pubsub.punsubscribe(*sent)  # its confirmation is read (and dropped) with the messages

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for messages and hand over those that came."""
        if self._sent_at is None and self._lists:
            if self._brpop is None:  # packed once per change of the lists' order, not per message
                ch = self.channel
                keys = [self._prefix + ch._q_for_pri(q, p) for p in ch.priority_steps for q in self._lists]
                self._brpop = self._conn.pack_command("BRPOP", *keys, self._timeout)
            self._conn.send_packed_command(self._brpop)
            self._sent_at = time.monotonic()
            self._register(self._conn, self._read_pop)
        elif self._sent_at is not None and time.monotonic() - self._sent_at > self._stale:
            raise redis.ConnectionError("no answer to BRPOP: the connection is half-open")  # as kombu
        if self._unsent and self._connecting is None:  # after the BRPOP: a first answer waits for it not
            self._subscribe()
        if not self._connected(wait=False):
            timeout = min(timeout, 0.001)  # its connection is polled as soon as it is made
        if self._unconfirmed and time.monotonic() - self._subscribed_at > self._stale:
            raise redis.ConnectionError("no answer to PSUBSCRIBE: the connection is half-open")
        if not self._fds:
            time.sleep(timeout)
            return
        for fd, _ in self._poll.poll(timeout * 1000):
            read = self._fds.get(fd)  # None: a connection replaced by a read before this one
            if read is not None:
                read()

    def close(self) -> None:
        """Give the connections back: the answer to a ``BRPOP`` out is awaited (a message popped
        goes back to the head of its list, as kombu requeues what comes for no consumer)."""
        conn, self._conn = self._conn, None
        try:
            if self._sent_at is not None:
                self._sent_at = None
                if not conn.can_read(timeout=self._timeout + 1.0):
                    raise redis.TimeoutError("no answer to BRPOP")
                popped = conn.read_response()
                if popped:
                    conn.send_command("RPUSH", popped[0], popped[1])
                    conn.read_response()
            self._pool.release(conn)
        except Exception as exc:
            logger.warning("forseti: closing a Redis consumer: %r", exc)
            conn.disconnect()
        if self._pubsub is not None:
            try:
                self._connected(wait=True)
                self._pubsub.close()
            except Exception as exc:
                logger.warning("forseti: closing a Redis subscription: %r", exc)

    # -- the reads ----------------------------------------------------------------------
    def _register(self, conn: Any, read: Callable[[], None]) -> None:
        fd = conn._sock.fileno()
        if self._fds.get(fd) != read:  # a new connection (bound methods are equal, never identical)
            for old in [f for f, r in self._fds.items() if r == read]:
                self._poll.unregister(old)
                del self._fds[old]
            self._poll.register(fd, select.POLLIN)
            self._fds[fd] = read

    def _read_pop(self) -> None:
        self._sent_at = None
        popped = self._conn.read_response()
        if not popped:
            return
        key = popped[0].decode()[len(self._prefix):].rsplit(self.channel.sep, 1)[0]
        if key in self._lists and self._lists[-1] != key:  # kombu's round robin: last used goes last
            self._lists.remove(key)
            self._lists.append(key)
            self._brpop = None
        self._hand_over(popped[1], key)

    def _read_fanouts(self) -> None:
        pubsub = self._pubsub
        while (response := pubsub.parse_response(block=False, timeout=0)) is not None:  # RESP2 and 3
            if self._unconfirmed and response[0] in (b"psubscribe", "psubscribe"):
                self._unconfirmed.discard(response[1] if isinstance(response[1], bytes) else response[1].encode())
            message = pubsub.handle_message(response, ignore_subscribe_messages=True)
            if message is not None and message["type"] == "pmessage":
                queue = self._topics.get(message["pattern"])
                if queue is not None and message["data"]:
                    self._hand_over(message["data"], queue)
        self._register(pubsub.connection, self._read_fanouts)  # redis-py reconnects (and resubscribes) it

    def _hand_over(self, raw: bytes, queue: str) -> None:
        try:
            delivery = envelope(raw)
        except (ValueError, RecursionError) as exc:  # JSON's errors and binascii's are ValueErrors
            logger.warning("forseti: skipped a message of %s that is no kombu envelope (%s): %r",
                           queue, exc, raw[:200])
            return
        self._deliver(delivery)
