"""py-amqp's frame reads, read ahead on a consumer's connection (core/transport/amqp.buffer_reads).

The frames read, their order, and what a read that times out keeps are py-amqp's own: pinned
against py-amqp's ``TCPTransport._read`` on the same bytes (a socket pair, a frame cut by a
timeout), and end to end on RabbitMQ (every message, in order, bodies of one frame and of many),
with the guard on and off.
"""

from __future__ import annotations

import socket
import struct
import uuid
from collections.abc import Iterator

import pytest
from amqp.transport import TCPTransport
from kombu import Connection, Consumer, Producer, Queue

from forseti_celery.core import compat
from forseti_celery.core.transport import amqp as amqp_transport


def _frame(type_: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", type_, 1, len(payload)) + payload + b"\xce"


def _transport_on(sock: socket.socket) -> TCPTransport:
    """A py-amqp TCP transport reading ``sock`` (a socket pair's end), as a connected one does."""
    transport = TCPTransport("127.0.0.1")
    transport.sock = sock
    transport._setup_transport()
    transport.connected = True
    return transport


class _Conn:  # what buffer_reads looks through: a kombu connection's ``connection.transport``
    def __init__(self, transport: TCPTransport) -> None:
        self.connection = self
        self.transport = transport


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("ahead", [False, True])
def test_frames_and_a_frame_cut_by_a_timeout_read_as_py_amqp_reads_them(
        pair: tuple[socket.socket, socket.socket], ahead: bool) -> None:
    ours, theirs = pair
    transport = _transport_on(ours)  # with py-amqp's own reads, or read ahead
    assert not ahead or amqp_transport.buffer_reads(_Conn(transport))
    frames = [_frame(1, b"m" * 12), _frame(2, b"h" * 30), _frame(3, b"b" * 5000), _frame(3, b""),
              _frame(1, b"x" * (amqp_transport.READ_AHEAD - 8)), _frame(3, b"y" * (3 * amqp_transport.READ_AHEAD))]
    theirs.sendall(b"".join(frames))
    got = [transport.read_frame() for _ in frames]
    assert [(t, bytes(p)) for t, _, p in got] == [(f[0], f[7:-1]) for f in frames]
    # A frame cut by a timeout: what was read of it is kept, and the next read returns it whole.
    cut = _frame(3, b"z" * 9000)
    ours.settimeout(0.05)
    theirs.sendall(cut[:5000])
    with pytest.raises(TimeoutError):
        transport.read_frame()
    theirs.sendall(cut[5000:] + _frame(1, b"next"))
    assert bytes(transport.read_frame()[2]) == b"z" * 9000
    assert bytes(transport.read_frame()[2]) == b"next"


def test_a_read_ahead_is_only_for_a_connected_tcp_transport_with_the_guard_on(
        pair: tuple[socket.socket, socket.socket]) -> None:
    assert not amqp_transport.buffer_reads(_Conn(TCPTransport("127.0.0.1")))  # not connected
    assert not amqp_transport.buffer_reads(object())  # Redis: no py-amqp transport
    with compat.PY_AMQP_READ.forced(False):
        transport = _transport_on(pair[0])
        assert not amqp_transport.buffer_reads(_Conn(transport))
        assert "_read" not in vars(transport)
    assert amqp_transport.buffer_reads(_Conn(transport)) and "_read" in vars(transport)


@pytest.mark.parametrize("ahead", [True, False])
def test_a_consumer_reading_ahead_gets_every_message_once_in_order(rabbitmq_url: str, ahead: bool) -> None:
    name = f"forseti-t-reads-{uuid.uuid4().hex[:8]}"
    bodies = [b"%d:" % i + b"v" * size for i, size in enumerate(
        [0, 1, 100, 4000, 4096, 5000, 200_000, 3, 140_000, 7] * 30)]  # bodies of one frame and of several
    with Connection(rabbitmq_url, heartbeat=10) as conn, Connection(rabbitmq_url) as pub:
        conn.ensure_connection()
        with compat.PY_AMQP_READ.forced(ahead):
            assert amqp_transport.buffer_reads(conn) is ahead
        channel = conn.channel()
        queue = Queue(name, auto_delete=True)
        queue(channel).declare()
        got: list[bytes] = []
        Consumer(channel, [queue], no_ack=True, on_message=lambda m: got.append(m.body), auto_declare=False).consume()
        producer = Producer(pub.default_channel)
        for body in bodies:
            producer.publish(body, routing_key=name, retry=False)
        idle = 0
        while len(got) < len(bodies) and idle < 20:
            try:
                conn.drain_events(timeout=0.25)
                idle = 0
            except TimeoutError:
                idle += 1
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.2)  # nothing more: none twice
        assert got == bodies


class _CountingSocket(socket.socket):
    """A socket that counts the changes of its timeout (py-amqp's ``having_timeout`` makes two a frame)."""

    changes = 0

    def settimeout(self, value: float | None) -> None:
        type(self).changes += 1
        super().settimeout(value)


def test_a_read_ahead_waits_for_a_frame_up_to_its_timeout_without_changing_the_sockets(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours = _CountingSocket(fileno=pair[0].detach())
    theirs = pair[1]
    transport = _transport_on(ours)
    assert amqp_transport.buffer_reads(_Conn(transport))
    frames = [_frame(1, b"m" * 12), _frame(2, b"h" * 30), _frame(3, b"b" * 5000)]
    theirs.sendall(b"".join(frames))

    def frame(timeout: float | None) -> bytes:  # what py-amqp's Connection.blocking_read does
        with transport.having_timeout(timeout):
            return bytes(transport.read_frame()[2])

    _CountingSocket.changes = 0
    assert [frame(0.5) for _ in frames] == [f[7:-1] for f in frames]
    with pytest.raises(TimeoutError):
        frame(0.05)  # nothing came
    cut = _frame(3, b"z" * 9000)
    theirs.sendall(cut[:5000])
    with pytest.raises(TimeoutError):
        frame(0.05)  # the rest did not come: what came is kept
    theirs.sendall(cut[5000:] + _frame(1, b"next"))
    assert frame(None) == b"z" * 9000
    assert frame(0.0) == b"next"
    assert _CountingSocket.changes == 0
    assert ours.gettimeout() is None  # blocking, as py-amqp leaves it between reads, for its writes
    ours.close()


def test_a_consumer_reading_ahead_never_changes_its_sockets_timeout(rabbitmq_url: str) -> None:
    name = f"forseti-t-reads-{uuid.uuid4().hex[:8]}"
    with Connection(rabbitmq_url, heartbeat=10) as conn, Connection(rabbitmq_url) as pub:
        conn.ensure_connection()
        assert amqp_transport.buffer_reads(conn)
        sock = conn.connection.transport.sock
        calls: list[float | None] = []
        setter = sock.settimeout
        conn.connection.transport.sock = _Recording(sock, calls)
        channel = conn.channel()
        queue = Queue(name, auto_delete=True)
        queue(channel).declare()
        got: list[bytes] = []
        Consumer(channel, [queue], no_ack=True, on_message=lambda m: got.append(m.body), auto_declare=False).consume()
        producer = Producer(pub.default_channel)
        for i in range(20):
            producer.publish(b"%d" % i, routing_key=name, retry=False)
        calls.clear()
        while len(got) < 20:
            conn.drain_events(timeout=5)
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.05)
        assert got == [b"%d" % i for i in range(20)]
        assert calls == []
        assert setter.__self__.gettimeout() is None


class _Recording:
    """A socket's stand-in recording ``settimeout`` calls (py-amqp's ``having_timeout`` makes them)."""

    def __init__(self, sock: socket.socket, calls: list[float | None]) -> None:
        self._sock = sock
        self._calls = calls

    def settimeout(self, value: float | None) -> None:
        self._calls.append(value)
        self._sock.settimeout(value)

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)
