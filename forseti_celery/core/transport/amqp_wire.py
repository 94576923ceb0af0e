"""kombu's RabbitMQ publish, written out: the message kombu's ``Producer`` makes, handed straight
to py-amqp's ``basic_publish`` on the channel it would use.

kombu's pyamqp ``Channel`` *is* a py-amqp ``Channel``: a ``Producer.publish`` ends in that
channel's ``basic_publish`` of an ``amqp.Message``, after building the properties (the
exchange's delivery mode, the expiration in whole milliseconds as a string), preparing the
body, looking up the exchange in the connection's cache of declared entities, and
``prepare_message``. A :class:`Wire` builds the same ``amqp.Message`` (the same properties, so
the same frames) and calls the same ``basic_publish``, for a publish that declares nothing: to
the default exchange, or to an exchange kombu has already declared on the connection (one it
would not declare again). Queues stay declared by the publisher as before.

What it mirrors sits behind :data:`KOMBU_AMQP_WIRE` (a :class:`~forseti_celery.core.compat.Guard`);
:func:`for_channel` answers ``None`` with the guard off or for a channel not kombu's pyamqp one:
the publisher then goes through kombu. ``tests/test_amqp_wire.py`` pins it against kombu's own
producer and consumer.

Before each publish, py-amqp's ``basic_publish`` reads what the broker sent, without waiting
(``connection.blocked``; the ``channel.close`` of a refused ``nowait`` declaration, which is how the
publisher learns of it): its socket set non-blocking, a ``recv``, set blocking again, three system
calls that almost always find nothing. A wire asks the socket itself whether anything waits (one
``recv`` with ``MSG_PEEK | MSG_DONTWAIT``, nothing taken), and only then lets ``basic_publish`` read
it; else it sends what ``basic_publish`` sends (its ``send_method`` of ``basic.publish``), one
``sendto``. A socket with a timeout, an SSL one, or a channel in confirm mode: ``basic_publish``.

What it sends it frames itself (:func:`frames`): for every publish py-amqp's ``send_method``
builds an ``amqp.Message``, serialises the method's arguments and the message's properties field
by field and packs the three frames into the connection's shared buffer. A wire keeps the method
frame of each routing key and the serialised properties of each (delivery mode, expiration), and
joins them with the body: the same bytes (checked against py-amqp's own frame writer by the guard,
on first use), in one write under that writer's lock, the connection's sent-frame count (its
heartbeat check's) raised as py-amqp raises it. A ``Publisher.publish`` then costs 40 % of the
instructions it did (docs/benchmarks.rst, "RabbitMQ's publish, framed by the wire"). Signed
headers' properties are serialised for each publish (by py-amqp's serialiser); a body py-amqp
would split across frames goes through ``send_method``.
"""

from __future__ import annotations

import socket
import struct
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from amqp import Channel, Message, spec
from amqp.exceptions import RecoverableConnectionError
from amqp.method_framing import FRAME_OVERHEAD
from amqp.serialization import dumps
from kombu.entity import maybe_delivery_mode

from ..compat import Guard, _missing, _version_in

__all__ = ["KOMBU_AMQP_WIRE", "Wire", "expiration_ms", "for_channel", "frames", "method_payload"]

_PROBE = {"body": b"x", "priority": 0, "content_type": "t", "content_encoding": "e", "headers": {"h": "v"},
          "properties": {"delivery_mode": 2, "expiration": "1000"}}


def _check() -> str | None:
    import amqp
    import kombu
    from kombu import messaging
    from kombu.transport import pyamqp

    prepared = pyamqp.Channel.prepare_message(None, *_PROBE.values())
    return (_version_in("kombu", tuple(kombu.VERSION[:3]), (5, 4), (5, 8))
            or _version_in("py-amqp", tuple(amqp.VERSION[:3]), (5, 0), (5, 5))
            or (None if issubclass(pyamqp.Channel, amqp.Channel) else "kombu's pyamqp Channel is not py-amqp's")
            or (None if "basic_publish" not in vars(pyamqp.Channel) else "kombu's pyamqp Channel has its own publish")
            or _missing(messaging.Producer, "_delivery_details", "_prepare", "_publish")
            or _missing(kombu.Connection, "declared_entities")
            or _missing(amqp.Channel, "_basic_publish", "send_method")
            or (None if amqp.Channel.basic_publish is amqp.Channel._basic_publish
                else "py-amqp's basic_publish is not _basic_publish")
            or (None if type(prepared) is Message and prepared.body == b"x" and prepared.properties == _message(
                "t", "e", {"h": "v"}, 2, "1000").properties else "kombu's prepare_message builds another message")
            or _check_lock()
            or _check_frames())


def _check_lock() -> str | None:
    """py-amqp's frame writer holds a lock (``buffer_lock``) around each write, which a wire's
    write holds too (:func:`_writer_lock`): without it a wire's frames could interleave with
    py-amqp's own on the connection."""
    from amqp.method_framing import frame_writer

    return None if "buffer_lock" in frame_writer.__code__.co_cellvars else "py-amqp's frame writer holds no buffer_lock"


def _py_amqp_frames(channel_id: int, exchange: str, routing_key: str, message: Message) -> bytes:
    """What py-amqp's frame writer writes for ``basic.publish`` of ``message``."""
    from amqp.method_framing import frame_writer

    class _Conn:
        frame_max = 131072
        bytes_sent = 0

    class _Transport:
        def __init__(self) -> None:
            self.out = b""

        def write(self, data: Any) -> None:
            self.out += bytes(data)

    transport = _Transport()
    frame_writer(_Conn(), transport)(1, channel_id, spec.Basic.Publish,
                                     dumps("Bssbb", (0, exchange, routing_key, False, False)), message)
    return transport.out


def _check_frames() -> str | None:
    for body, headers, expiration in ((b"x" * 300, {}, "1000"), (b"", {"h": "v"}, None)):
        message = _message("t", "e", headers, 2, expiration, body)
        ours = frames(7, method_payload("ex", "rk"), message._serialize_properties(), body)
        if ours != _py_amqp_frames(7, "ex", "rk", message):
            return "py-amqp frames a publish otherwise"
    return None


#: kombu's ``Producer.publish`` / ``_publish`` and pyamqp ``Channel.prepare_message``, written out:
#: the ``amqp.Message`` kombu publishes, given to the channel's ``basic_publish``.
KOMBU_AMQP_WIRE = Guard(
    "kombu RabbitMQ publish", "publishing through kombu's Producer (a slower publish)", _check,
)


_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


def expiration_ms(expiration: float) -> str:
    """A message's ``expiration`` property as kombu's ``Producer.publish`` writes it."""
    return str(int(expiration * 1000))


_FRAME = struct.Struct(">BHI")  # frame type, channel, payload size
_CONTENT_HEADER = struct.Struct(">HHQ")  # class, weight, body size
_PUBLISH = struct.pack(">HH", *spec.Basic.Publish)
_END = b"\xce"
#: Routing keys (and property sets) whose frames a wire keeps: a client's are its workers' node
#: queues, a worker's the reply queues of its clients; past this many it starts again.
_KEPT = 256


def method_payload(exchange: str, routing_key: str) -> bytes:
    """The payload of a ``basic.publish`` method frame (ticket 0, neither mandatory nor immediate)."""
    args: bytes = dumps("Bssbb", (0, exchange, routing_key, False, False))
    return _PUBLISH + args


def frames(channel_id: int, method: bytes, properties: bytes, body: bytes) -> bytes:
    """A publish's frames, as py-amqp writes them when they fit one frame each: the method frame
    (``method``: :func:`method_payload`), the content header (``properties``: serialised, as
    ``amqp.Message._serialize_properties`` does) and the body's frame (none for an empty body)."""
    header = _CONTENT_HEADER.pack(spec.Basic.Publish[0], 0, len(body)) + properties
    parts = [_FRAME.pack(1, channel_id, len(method)), method, _END, _FRAME.pack(2, channel_id, len(header)), header,
             _END]
    if body:
        parts += [_FRAME.pack(3, channel_id, len(body)), body, _END]
    return b"".join(parts)


def _writer_lock(connection: Any) -> AbstractContextManager[Any]:
    """The lock py-amqp's frame writer holds around a write (``buffer_lock``), else none."""
    writer = getattr(connection, "_frame_writer", None)
    code, cells = getattr(writer, "__code__", None), getattr(writer, "__closure__", None)
    if code is not None and cells is not None:
        for name, cell in zip(code.co_freevars, cells, strict=False):
            if name == "buffer_lock":
                return cell.cell_contents  # type: ignore[no-any-return]
    return nullcontext()


def _message(content_type: str, content_encoding: str, headers: dict[str, str], mode: int,
             expiration: str | None, body: bytes = b"x") -> Message:
    properties: dict[str, Any] = {"delivery_mode": mode}
    if expiration is not None:
        properties["expiration"] = expiration
    return Message(body, priority=0, content_type=content_type, content_encoding=content_encoding,
                   application_headers=headers, **properties)


class Wire:
    """The publishes of one kombu pyamqp channel, as kombu's ``Producer`` makes them."""

    def __init__(self, channel: Any, content_type: str, content_encoding: str) -> None:
        self._channel = channel
        self._content_type = content_type
        self._content_encoding = content_encoding
        self._methods: dict[tuple[str, str], bytes] = {}
        self._properties: dict[tuple[int, str | None], bytes] = {}
        self._lock: tuple[Any, AbstractContextManager[Any]] | None = None  # (connection, its writer's lock)

    def routes(self, exchange: Any, routing_key: str) -> bool:
        """Whether kombu would publish to ``exchange`` declaring nothing: the default exchange,
        or one in the connection's cache of declared entities (``maybe_declare``'s)."""
        if not exchange.name:
            return True
        connection = self._channel.connection
        return connection is not None and hash(exchange) in connection.client.declared_entities

    def publish(self, exchange: Any, routing_key: str, body: bytes, headers: dict[str, str] | None,
                expiration: float | None) -> None:
        """Publish ``body`` (:meth:`routes` true) as kombu would; raises py-amqp's errors."""
        mode = maybe_delivery_mode(exchange.delivery_mode)
        ms = None if expiration is None else expiration_ms(expiration)
        channel = self._channel
        connection = channel.connection
        sock = None if connection is None or connection.transport is None else connection.transport.sock
        if type(sock) is socket.socket and sock.gettimeout() is None and "basic_publish" not in vars(channel):
            try:
                sock.recv(1, _PEEK)
            except BlockingIOError:  # nothing from the broker: basic_publish's read would find nothing
                try:
                    self._send(connection, exchange.name, routing_key, body, headers, mode, ms)
                except TimeoutError:  # as basic_publish: a dead socket, a connection error
                    raise RecoverableConnectionError("basic_publish: timed out") from None
                return
            except OSError:
                pass  # basic_publish meets it and raises what it raises
        channel.basic_publish(self._message(headers, mode, ms, body), exchange=exchange.name, routing_key=routing_key,
                              mandatory=False, immediate=False, timeout=None, confirm_timeout=None)

    def _message(self, headers: dict[str, str] | None, mode: int, expiration: str | None, body: bytes) -> Message:
        return _message(self._content_type, self._content_encoding, {} if headers is None else headers, mode,
                        expiration, body)

    def _send(self, connection: Any, exchange: str, routing_key: str, body: bytes, headers: dict[str, str] | None,
              mode: int, expiration: str | None) -> None:
        """What ``send_method`` of ``basic.publish`` sends, framed here (:func:`frames`)."""
        method = self._methods.get((exchange, routing_key))
        if method is None:
            if len(self._methods) >= _KEPT:
                self._methods.clear()
            method = self._methods[exchange, routing_key] = method_payload(exchange, routing_key)
        if headers:  # signed: the properties of this body's
            properties = self._message(headers, mode, expiration, b"")._serialize_properties()
        else:
            properties = self._properties.get((mode, expiration))
            if properties is None:
                if len(self._properties) >= _KEPT:
                    self._properties.clear()
                properties = self._properties[mode, expiration] = self._message(
                    None, mode, expiration, b"")._serialize_properties()
        channel = self._channel
        if len(method) + len(properties) + len(body) + FRAME_OVERHEAD > connection.frame_max - 8:
            # py-amqp writes a body past one frame in frames of its own
            channel.send_method(spec.Basic.Publish, "Bssbb", (0, exchange, routing_key, False, False),
                                self._message(headers, mode, expiration, body))
            return
        data = frames(channel.channel_id, method, properties, body)
        if self._lock is None or self._lock[0] is not connection:
            self._lock = (connection, _writer_lock(connection))
        with self._lock[1]:
            connection.transport.write(data)
        connection.bytes_sent += 1


def for_channel(channel: Any, content_type: str, content_encoding: str) -> Wire | None:
    """The :class:`Wire` of kombu pyamqp ``channel`` (one per channel), or ``None``: publish
    through kombu (the guard off, or another transport's channel)."""
    wire: Wire | None = getattr(channel, "_forseti_wire", None)
    if wire is not None:
        return wire if KOMBU_AMQP_WIRE.ok() else None
    if not isinstance(channel, Channel) or not KOMBU_AMQP_WIRE.ok():
        return None
    wire = channel._forseti_wire = Wire(channel, content_type, content_encoding)
    return wire
