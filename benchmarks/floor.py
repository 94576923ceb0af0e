"""The floor column of ``make bench``: the round trip of a call with nothing but the broker's own
client library (redis-py, py-amqp), the limit any call through that broker can approach.

A client pushes a request; a relay process takes it, passes it through a pipe to a child process
and back (as a worker passes a call to a keyed process), pushes the reply; the client takes it.

* Redis: the client ``LPUSH``es ``reply-list|payload`` to the request list and ``BRPOP``s its reply
  list; the relay ``BRPOP``s the request list and ``LPUSH``es the reply.
* RabbitMQ: the client declares an exclusive reply queue, consumes it (``no_ack``) and publishes the
  request to the relay's queue (default exchange, ``reply_to``); the relay consumes that queue
  (``no_ack``) and publishes the reply to ``reply_to``.

:class:`Floor` runs the relay (``python -m benchmarks.floor relay KIND URL QUEUE``) and times round
trips from this process; :func:`first_request` times the first request of a new client process, its
connection (and, on RabbitMQ, its reply queue) included, imports not (as the forseti probe).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import uuid
from typing import Any, cast

from benchmarks.common import ROOT

_LEN = struct.Struct(">I")


def _child(rfd: int, wfd: int) -> None:
    """The keyed process's stand-in: every frame read from the pipe is written back."""
    with os.fdopen(rfd, "rb", buffering=0) as rd, os.fdopen(wfd, "wb", buffering=0) as wr:
        while True:
            head = rd.read(4)
            if len(head) < 4:
                return
            body = rd.read(_LEN.unpack(head)[0])
            wr.write(head + body)


def _fork_child() -> Any:
    """Fork the echo child; return ``through(payload) -> payload`` (there and back through pipes)."""
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    if os.fork() == 0:  # pragma: no cover - the child
        os.close(to_child_w)
        os.close(from_child_r)
        try:
            _child(to_child_r, from_child_w)
        finally:
            os._exit(0)
    os.close(to_child_r)
    os.close(from_child_w)
    wr = os.fdopen(to_child_w, "wb", buffering=0)
    rd = os.fdopen(from_child_r, "rb", buffering=0)

    def through(payload: bytes) -> bytes:
        wr.write(_LEN.pack(len(payload)) + payload)
        n = _LEN.unpack(rd.read(4))[0]
        return bytes(rd.read(n))

    return through


def relay(kind: str, url: str, queue: str) -> None:
    """The relay process: serve the request queue until killed."""
    through = _fork_child()
    if kind == "redis":
        import redis

        r = redis.Redis.from_url(url)
        print("ready", flush=True)
        while True:
            got = r.brpop([queue], timeout=1)  # below redis-py's socket timeout (5 s since redis-py 6)
            if got is None:
                continue
            reply_to, _, payload = cast(bytes, got[1]).partition(b"|")
            r.lpush(reply_to, through(payload))
    else:
        import amqp

        conn = _amqp_connect(url)
        ch = conn.channel()
        ch.queue_declare(queue, auto_delete=True)

        def on_message(msg: Any) -> None:
            ch.basic_publish(amqp.Message(through(msg.body)), exchange="", routing_key=msg.properties["reply_to"])

        ch.basic_consume(queue, no_ack=True, callback=on_message)
        print("ready", flush=True)
        while True:
            conn.drain_events()


def _amqp_connect(url: str) -> Any:
    import amqp
    from kombu.utils.url import url_to_parts

    _, host, port, user, password, vhost = url_to_parts(url)[:6]
    conn = amqp.Connection(f"{host or '127.0.0.1'}:{port or 5672}", userid=user or "guest",
                           password=password or "guest", virtual_host=vhost or "/")
    conn.connect()
    return conn


class _RedisClient:
    def __init__(self, url: str, queue: str) -> None:
        import redis

        self.r = redis.Redis.from_url(url)
        self.queue = queue
        self.reply = f"{queue}.reply.{uuid.uuid4().hex[:8]}"

    def call(self, payload: bytes) -> bytes:
        self.r.lpush(self.queue, self.reply.encode() + b"|" + payload)
        for _ in range(10):
            got = self.r.brpop([self.reply], timeout=1)  # below redis-py's socket timeout
            if got is not None:
                return cast(bytes, got[1])
        raise TimeoutError("the floor relay did not answer")

    def close(self) -> None:
        self.r.close()


class _AmqpClient:
    def __init__(self, url: str, queue: str) -> None:
        self.conn = _amqp_connect(url)
        self.ch = self.conn.channel()
        self.queue = queue
        self.reply = self.ch.queue_declare("", exclusive=True, auto_delete=True).queue
        self.got: list[bytes] = []
        self.ch.basic_consume(self.reply, no_ack=True, callback=lambda msg: self.got.append(msg.body))

    def call(self, payload: bytes) -> bytes:
        import amqp

        self.ch.basic_publish(amqp.Message(payload, reply_to=self.reply), exchange="", routing_key=self.queue)
        deadline = time.monotonic() + 10
        while not self.got:
            self.conn.drain_events(timeout=max(0.001, deadline - time.monotonic()))
        return self.got.pop(0)

    def close(self) -> None:
        self.conn.close()


def client(kind: str, url: str, queue: str) -> _RedisClient | _AmqpClient:
    """A connected client of the relay serving ``queue``."""
    return _RedisClient(url, queue) if kind == "redis" else _AmqpClient(url, queue)


class Floor:
    """The relay of one broker, and a client of it in this process."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = "redis" if kind == "redis" else "amqp"
        self.url = url
        self.queue = f"forseti-bench-floor.{uuid.uuid4().hex[:8]}"
        self._proc: subprocess.Popen[str] | None = None
        self._client: _RedisClient | _AmqpClient | None = None

    def start(self) -> Floor:
        self._proc = subprocess.Popen([sys.executable, "-m", "benchmarks.floor", "relay", self.kind, self.url,
                                       self.queue], cwd=str(ROOT), stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the floor relay did not start")
        self._client = client(self.kind, self.url, self.queue)
        self.call(0)
        return self

    def call(self, i: int) -> None:
        """One round trip (the payload is about a forseti call's size)."""
        assert self._client is not None
        payload = b"%d" % i + b"x" * 120
        if self._client.call(payload) != payload:
            raise RuntimeError("the floor relay answered something else")

    def first_request(self) -> float:
        """Milliseconds of the first round trip of a new client process, connecting included."""
        proc = subprocess.run([sys.executable, "-m", "benchmarks.floor", "first", self.kind, self.url, self.queue],
                              cwd=str(ROOT), capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"floor probe failed: {proc.stderr.strip()[-300:]}")
        return float(json.loads(proc.stdout.strip().splitlines()[-1])["first_ms"])

    def stop(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # best effort
                pass
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)


def main(argv: list[str]) -> None:
    what, kind, url, queue = argv
    if what == "relay":
        relay(kind, url, queue)
        return
    import amqp  # noqa: F401 - imported before the clock starts, as the forseti probe imports its app
    import redis  # noqa: F401

    t0 = time.perf_counter()
    c = client(kind, url, queue)
    c.call(b"first")
    t1 = time.perf_counter()
    c.close()
    print(json.dumps({"first_ms": (t1 - t0) * 1000}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
