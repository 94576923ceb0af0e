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
"""

from __future__ import annotations

import socket
from typing import Any

from amqp import Channel, Message, spec
from amqp.exceptions import RecoverableConnectionError
from kombu.entity import maybe_delivery_mode

from ..compat import Guard, _missing, _version_in

__all__ = ["KOMBU_AMQP_WIRE", "Wire", "expiration_ms", "for_channel"]

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
                "t", "e", {"h": "v"}, 2, "1000").properties else "kombu's prepare_message builds another message"))


#: kombu's ``Producer.publish`` / ``_publish`` and pyamqp ``Channel.prepare_message``, written out:
#: the ``amqp.Message`` kombu publishes, given to the channel's ``basic_publish``.
KOMBU_AMQP_WIRE = Guard(
    "kombu RabbitMQ publish", "publishing through kombu's Producer (a slower publish)", _check,
)


_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


def expiration_ms(expiration: float) -> str:
    """A message's ``expiration`` property as kombu's ``Producer.publish`` writes it."""
    return str(int(expiration * 1000))


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
        message = _message(self._content_type, self._content_encoding, {} if headers is None else headers,
                           maybe_delivery_mode(exchange.delivery_mode),
                           None if expiration is None else expiration_ms(expiration), body)
        channel = self._channel
        connection = channel.connection
        sock = None if connection is None or connection.transport is None else connection.transport.sock
        if type(sock) is socket.socket and sock.gettimeout() is None and "basic_publish" not in vars(channel):
            try:
                sock.recv(1, _PEEK)
            except BlockingIOError:  # nothing from the broker: basic_publish's read would find nothing
                try:
                    channel.send_method(spec.Basic.Publish, "Bssbb", (0, exchange.name, routing_key, False, False),
                                        message)
                except TimeoutError:  # as basic_publish: a dead socket, a connection error
                    raise RecoverableConnectionError("basic_publish: timed out") from None
                return
            except OSError:
                pass  # basic_publish meets it and raises what it raises
        channel.basic_publish(message, exchange=exchange.name, routing_key=routing_key, mandatory=False,
                              immediate=False, timeout=None, confirm_timeout=None)


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
