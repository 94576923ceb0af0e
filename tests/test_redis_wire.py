"""The Redis publish written by forseti (:mod:`forseti_celery.core.transport.redis_wire`), against
kombu's own producer and consumer on a real Redis: kombu's consumer gets from it what kombu's
producer would have sent (body, headers, content type and encoding, properties), in the order
published (batches of ``publish_many`` to several queues included), signed headers admitted; a
list's TTL is raised with each push, never lowered. With the guard forced off, kombu's own path
gives the same results.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection, Consumer, Exchange, Producer, Queue

from forseti_celery.core import protocol as p
from forseti_celery.core import transport
from forseti_celery.core.broker import Publisher
from forseti_celery.core.errors import BrokerUnavailable
from forseti_celery.core.signing import Signer
from forseti_celery.core.transport import redis_wire
from forseti_celery.testing import wait_for

DEFAULT = Exchange("")
PREFIXES = ["", "pfx:"]


def test_the_guard_accepts_the_installed_kombu_and_redis_py() -> None:
    # Past its range every publish would silently take kombu's slower path: widen the range
    # after this module's contracts pass on the new version.
    assert redis_wire.KOMBU_REDIS_WIRE._check() is None


def _app(redis_url: str, prefix: str = "") -> Celery:
    app = Celery("wire-test", broker=redis_url, set_as_current=False)
    if prefix:
        app.conf.broker_transport_options = {"global_keyprefix": prefix}
    return app


@contextmanager
def _publisher(app: Celery, wired: bool, **kwargs: Any) -> Iterator[Publisher]:
    with redis_wire.KOMBU_REDIS_WIRE.forced(wired):
        publisher = Publisher(app.connection_for_write(), **kwargs)
        try:
            yield publisher
            channel = publisher._ready().channel
            assert (transport.wire(transport.redis, channel, p.CONTENT_TYPE, p.CONTENT_ENCODING) is not None) is wired
        finally:
            publisher.close()


def _name() -> str:
    return f"forseti-t-wire-{uuid.uuid4().hex[:8]}"


def _get(conn: Connection, name: str, no_ack: bool = True) -> Any:
    """The next message of queue ``name`` through kombu's consumer (its body left undecoded)."""
    return wait_for(lambda: conn.default_channel.basic_get(name, no_ack=no_ack), 5, 0.01, f"nothing came on {name}")


def _seen(message: Any) -> dict[str, Any]:
    """What kombu's consumer exposes of ``message``, but its delivery tag (one per message)."""
    properties = {k: v for k, v in message.properties.items() if k != "delivery_tag"}
    return {"body": message.body, "headers": message.headers, "content_type": message.content_type,
            "content_encoding": message.content_encoding, "properties": properties,
            "delivery_info": {k: message.delivery_info.get(k) for k in ("exchange", "routing_key")}}


@pytest.mark.parametrize("prefix", PREFIXES, ids=["no key prefix", "global_keyprefix"])
def test_kombu_gets_from_the_wire_what_kombus_producer_sends(redis_url: str, prefix: str) -> None:
    app = _app(redis_url, prefix)
    name = _name()
    msgs = [{"t": p.CAST, "k": "k1", "payload": "é\"x"}]
    for wired in (True, False):  # the wire's message first, kombu's second
        with _publisher(app, wired, keep=lambda rk: 30.0) as publisher:
            publisher.publish(DEFAULT, name, msgs)
    with redis.Redis.from_url(redis_url) as r:
        raw = [json.loads(m) for m in reversed(r.lrange(prefix + name, 0, -1))]
    assert len(raw) == 2
    tags = [m["properties"].pop("delivery_tag") for m in raw]
    assert raw[0] == raw[1] and tags[0] != tags[1]
    with Connection(redis_url, transport_options=app.conf.broker_transport_options) as conn:
        got = [_get(conn, name, no_ack=False) for _ in range(2)]  # acked: kombu keeps each by its tag till then
        for message in got:
            message.ack()
        seen = [_seen(m) for m in got]
        assert seen[0] == seen[1]
        assert got[0].body == p.encode(msgs)
        assert seen[0]["content_type"] == p.CONTENT_TYPE and seen[0]["content_encoding"] == p.CONTENT_ENCODING
        assert seen[0]["delivery_info"] == {"exchange": "", "routing_key": name}
        assert seen[0]["properties"]["delivery_mode"] == 2 and got[0].delivery_tag != got[1].delivery_tag
        with redis.Redis.from_url(redis_url) as r:
            assert r.llen(prefix + name) == 0
            assert not r.hgetall(prefix + "unacked"), "an acked message stayed in kombu's unacked table"


def test_a_fanout_from_the_wire_reaches_kombus_subscriber_as_kombus_own(redis_url: str) -> None:
    app = _app(redis_url)
    exchange = Exchange(f"forseti-t-wire-{uuid.uuid4().hex[:8]}.bcast", type="fanout", durable=False)
    got: list[Any] = []
    with Connection(redis_url) as conn:
        queue = Queue(_name(), exchange, auto_delete=True)
        with Consumer(conn.channel(), [queue], no_ack=True, on_message=got.append):

            def subscribed() -> bool:  # kombu subscribes (PSUBSCRIBE) as it first polls: probe until heard
                Producer(conn.default_channel).publish(b"probe", exchange=exchange, routing_key="")
                with suppress(TimeoutError):
                    conn.drain_events(timeout=0.05)
                return bool(got)

            wait_for(subscribed, 10, 0.01, "kombu's consumer never subscribed to the fanout")
            with suppress(TimeoutError):
                while True:
                    conn.drain_events(timeout=0.2)  # the probes still on their way
            got.clear()
            for wired in (True, False):
                with _publisher(app, wired) as publisher:
                    publisher.publish(exchange, "", [{"t": p.HEARTBEAT, "i": int(wired)}])
            while len(got) < 2:
                conn.drain_events(timeout=5)
    seen = [_seen(m) for m in got]
    assert [p.decode(m.body, routed=False)[0]["i"] for m in got] == [1, 0]
    seen[0]["body"] = seen[1]["body"]
    assert seen[0] == seen[1] and seen[0]["delivery_info"] == {"exchange": exchange.name, "routing_key": ""}


@pytest.mark.parametrize("wired", [True, False], ids=["wire", "kombu"])
def test_publishes_and_batches_to_several_queues_arrive_in_their_order(redis_url: str, wired: bool) -> None:
    app = _app(redis_url)
    names = [_name() for _ in range(3)]
    sent: dict[str, list[int]] = {n: [] for n in names}
    with _publisher(app, wired, keep=lambda rk: 30.0 if rk != names[2] else None) as publisher:
        i = 0
        for round_ in range(20):
            batches = []
            for n in names * 2:
                batches.append((n, [{"t": p.CAST, "i": i}, {"t": p.CAST, "i": i + 1}]))
                sent[n] += [i, i + 1]
                i += 2
            publisher.publish_many(DEFAULT, batches)
            publisher.publish(DEFAULT, names[round_ % 3], [{"t": p.CAST, "i": i}])
            sent[names[round_ % 3]].append(i)
            i += 1
    with Connection(redis_url) as conn:
        for n in names:
            got: list[int] = []
            while len(got) < len(sent[n]):
                got += [m["i"] for m in p.decode(_get(conn, n).body, routed=False)]
            assert got == sent[n]
    with redis.Redis.from_url(redis_url) as r:
        assert r.exists(*names) == 0, "more was pushed than published"


@pytest.mark.parametrize("wired", [True, False], ids=["wire", "kombu"])
def test_a_push_raises_its_lists_ttl_and_never_lowers_it(redis_url: str, wired: bool) -> None:
    app = _app(redis_url)
    name, other = _name(), _name()
    with _publisher(app, wired, keep=lambda rk: 30.0) as publisher, redis.Redis.from_url(redis_url) as r:
        publisher.publish(DEFAULT, name, [{"t": p.CAST}])
        assert 0 < r.pttl(name) <= 30_000
        r.pexpire(name, 100_000)
        publisher.publish(DEFAULT, name, [{"t": p.CAST}])
        publisher.publish_many(DEFAULT, [(name, [{"t": p.CAST}]), (other, [{"t": p.CAST}])])
        assert r.pttl(name) > 30_000, "a push lowered its list's TTL"
        r.persist(name)  # -1: no TTL yet
        publisher.publish(DEFAULT, name, [{"t": p.CAST}])
        assert 0 < r.pttl(name) <= 30_000 and 0 < r.pttl(other) <= 30_000
        publisher.publish(DEFAULT, name, [{"t": p.CAST}], expiration=60)
        assert r.pttl(name) > 30_000, "a message expiring later did not raise its list's TTL"
        r.delete(name)
        publisher.keep_alive(name)
        assert r.exists(name) == 0, "keep_alive made a list"
        assert r.llen(other) == 1
        r.delete(other)


def test_a_server_without_the_script_cached_still_gets_the_ttl_raised(redis_url: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # EVALSHA of a script the server never ran (or flushed) answers NOSCRIPT: the wire then EVALs
    # it (which caches it); the push before it in the same write is not sent again.
    script = f"{redis_wire.KEEP_AT_LEAST}-- {uuid.uuid4().hex}\n"
    monkeypatch.setattr(redis_wire, "KEEP_AT_LEAST", script)
    monkeypatch.setattr(redis_wire, "_KEEP_SHA", hashlib.sha1(script.encode()).hexdigest())
    app = _app(redis_url)
    name = _name()
    with _publisher(app, True, keep=lambda rk: 30.0) as publisher, redis.Redis.from_url(redis_url) as r:
        assert r.script_exists(redis_wire._KEEP_SHA) == [False]
        publisher.publish(DEFAULT, name, [{"t": p.CAST}])
        assert r.llen(name) == 1 and 0 < r.pttl(name) <= 30_000
        assert r.script_exists(redis_wire._KEEP_SHA) == [True]
        r.persist(name)
        publisher.publish(DEFAULT, name, [{"t": p.CAST}])
        assert r.llen(name) == 2 and 0 < r.pttl(name) <= 30_000
        r.delete(name)


@pytest.mark.parametrize("wired", [True, False], ids=["wire", "kombu"])
def test_a_signed_publish_is_admitted_by_a_worker_of_the_same_secret(redis_url: str, wired: bool) -> None:
    app = _app(redis_url)
    name = _name()
    msgs = [{"t": p.HEARTBEAT, "i": 1}, {"t": p.CAST, "i": 2}]
    with _publisher(app, wired, signer=Signer(["s3cret"], "w1@host", 10.0)) as publisher:
        publisher.publish(DEFAULT, name, msgs)
        publisher.publish_many(DEFAULT, [(name, msgs), (name, msgs)])
    with Connection(redis_url) as conn:
        got = [_get(conn, name) for _ in range(3)]
    receiver, forger = Signer(["s3cret"], "w2@host", 10.0), Signer(["other"], "w2@host", 10.0)
    for message in got:
        batch = p.decode(message.body, routed=False)
        assert [m["i"] for m in receiver.admit(message, batch)] == [1, 2]
        assert [m["i"] for m in forger.admit(message, p.decode(message.body, routed=False))] == [2]
    assert [m["i"] for m in receiver.admit(got[0], p.decode(got[0].body, routed=False))] == [2], "a replay was admitted"


def test_rabbitmq_publishes_through_kombu(rabbitmq_url: str) -> None:
    app = Celery("wire-test", broker=rabbitmq_url, set_as_current=False)
    publisher = Publisher(app.connection_for_write())
    try:
        channel = publisher._ready().channel
        assert transport.wire(transport.for_connection(publisher._conn), channel, p.CONTENT_TYPE,
                              p.CONTENT_ENCODING) is None
        assert redis_wire.for_channel(channel, p.CONTENT_TYPE, p.CONTENT_ENCODING) is None
    finally:
        publisher.close()


def _wire_of(publisher: Publisher) -> redis_wire.Wire:
    wire = transport.wire(transport.redis, publisher._ready().channel, p.CONTENT_TYPE, p.CONTENT_ENCODING)
    assert wire is not None
    return wire


def _kept(publisher: Publisher) -> Any:
    """The connection the publisher's wire keeps (after a publish)."""
    conn = _wire_of(publisher)._conn
    assert conn is not None and conn._sock is not None, "the wire keeps no connection"
    return conn


def _addr(conn: Any) -> str:
    host, port = conn._sock.getsockname()[:2]
    return f"{host}:{port}"


def _pushed(r: redis.Redis, name: str) -> list[Any]:
    """What was pushed to list ``name``, oldest first: each broker message's ``i``."""
    bodies = [base64.b64decode(json.loads(m)["body"]) for m in reversed(r.lrange(name, 0, -1))]
    return [m["i"] for body in bodies for m in p.decode(body, routed=False)]


def test_a_publish_is_one_write_on_the_connection_the_wire_keeps(redis_url: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Taking a connection from redis-py's pool for each publish costs five system calls more
    # (its pid check twice, its check that nothing is left to read): the wire keeps one.
    app = _app(redis_url)
    name = _name()
    with _publisher(app, True, keep=lambda rk: 30.0) as publisher, redis.Redis.from_url(redis_url) as r:
        publisher.publish(DEFAULT, name, [{"t": p.CAST, "i": 0}])
        conn = _kept(publisher)
        pool = _wire_of(publisher)._pool
        taken: list[Any] = []
        get, release = pool.get_connection, pool.release
        monkeypatch.setattr(pool, "get_connection", lambda *a, **k: taken.append(a) or get(*a, **k))
        monkeypatch.setattr(pool, "release", lambda c: taken.append(c) or release(c))
        sent: list[bytes] = []
        send = conn.send_packed_command
        monkeypatch.setattr(conn, "send_packed_command", lambda packed, **kw: sent.append(packed) or send(packed, **kw))
        for i in range(1, 4):
            publisher.publish(DEFAULT, name, [{"t": p.CAST, "i": i}])
        publisher.publish_many(DEFAULT, [(name, [{"t": p.CAST, "i": 4}]), (name, [{"t": p.CAST, "i": 5}])])
        assert not taken and len(sent) == 4 and _kept(publisher) is conn
        assert _pushed(r, name) == [0, 1, 2, 3, 4, 5]
        r.delete(name)


@pytest.mark.parametrize("kill", ["id", "addr"])
@pytest.mark.parametrize("then", ["publish", "publish_many"])
def test_a_publish_after_its_kept_connection_was_killed_is_sent_once_on_a_new_one(redis_url: str, kill: str,
                                                                                 then: str) -> None:
    # What redis-py's pool found before a send (a connection the server closed), the wire finds
    # as it reads the answers of its kept one: sent again once, on a new one; nothing twice.
    app = _app(redis_url)
    name = _name()
    with _publisher(app, True, keep=lambda rk: 30.0) as publisher, redis.Redis.from_url(redis_url) as r:
        publisher.publish(DEFAULT, name, [{"t": p.CAST, "i": 0}])
        conn = _kept(publisher)
        killed = _addr(conn)
        if kill == "id":
            conn.send_command("CLIENT", "ID")
            assert r.client_kill_filter(_id=conn.read_response()) == 1
        else:
            assert r.client_kill(killed) is True
        if then == "publish":
            publisher.publish(DEFAULT, name, [{"t": p.CAST, "i": 1}])
        else:
            publisher.publish_many(DEFAULT, [(name, [{"t": p.CAST, "i": 1}]), (name, [{"t": p.CAST, "i": 2}])])
        publisher.publish_many(DEFAULT, [(name, [{"t": p.CAST, "i": 3}]), (name, [{"t": p.CAST, "i": 4}])])
        assert _addr(_kept(publisher)) != killed
        assert _pushed(r, name) == ([0, 1, 3, 4] if then == "publish" else [0, 1, 2, 3, 4])
        assert 0 < r.pttl(name) <= 30_000
        r.delete(name)


def test_a_lost_broker_is_still_an_error(redis_url: str) -> None:
    # Sent again once only: a connection that cannot be made again fails the publish as before.
    app = _app(redis_url)
    name = _name()
    with _publisher(app, True) as publisher:
        publisher.publish(DEFAULT, name, [{"t": p.CAST, "i": 0}])
        wire = _wire_of(publisher)
        conn = _kept(publisher)
        conn._sock.shutdown(2)  # as if the server had closed it
        port = conn.port
        wire._pool.connection_kwargs["port"] = conn.port = 1  # nothing listens there: connecting again fails
        try:
            with pytest.raises(BrokerUnavailable):
                publisher.publish_many(DEFAULT, [(name, [{"t": p.CAST, "i": 1}]), (name, [{"t": p.CAST, "i": 2}])])
        finally:
            wire._pool.connection_kwargs["port"] = conn.port = port
        publisher.publish(DEFAULT, name, [{"t": p.CAST, "i": 3}])
    with redis.Redis.from_url(redis_url) as r:
        assert _pushed(r, name) == [0, 3]
        r.delete(name)


def test_a_forked_process_publishes_on_a_connection_of_its_own(redis_url: str) -> None:
    app = _app(redis_url)
    name = _name()
    with _publisher(app, True) as publisher, redis.Redis.from_url(redis_url) as r:
        publisher.publish(DEFAULT, name, [{"t": p.CAST, "i": 0}])
        parent = _kept(publisher)
        parent_addr = _addr(parent)
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its own connection, the parent's never written
            code = 1
            try:
                publisher.publish(DEFAULT, name, [{"t": p.CAST, "i": 1}])
                os.write(wfd, _addr(_kept(publisher)).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(wfd)
        child_addr = os.read(rfd, 100).decode()
        os.close(rfd)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert child_addr and child_addr != parent_addr, "the child published on its parent's connection"
        publisher.publish(DEFAULT, name, [{"t": p.CAST, "i": 2}])
        assert _kept(publisher) is parent, "the parent's connection did not outlive its child"
        assert _pushed(r, name) == [0, 1, 2]
        assert child_addr not in {c["addr"] for c in r.client_list()}, "the child's connection outlived it"
        r.delete(name)


def test_publishes_from_several_threads_keep_each_threads_order(redis_url: str) -> None:
    app = _app(redis_url)
    name = _name()
    threads, each = 4, 150
    start = threading.Barrier(threads)

    def publish(t: int, publisher: Publisher) -> None:
        start.wait()
        for i in range(each):
            if i % 3:
                publisher.publish(DEFAULT, name, [{"t": p.CAST, "i": [t, i]}])
            else:
                publisher.publish_many(DEFAULT, [(name, [{"t": p.CAST, "i": [t, i]}]), (name, [])])
    with _publisher(app, True, keep=lambda rk: 30.0) as publisher, redis.Redis.from_url(redis_url) as r:
        workers = [threading.Thread(target=publish, args=(t, publisher)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        got = _pushed(r, name)
        r.delete(name)
    assert sorted(map(tuple, got)) == [(t, i) for t in range(threads) for i in range(each)]
    for t in range(threads):
        assert [i for u, i in got if u == t] == list(range(each))


def test_closing_the_publisher_closes_the_kept_connection(redis_url: str) -> None:
    app = _app(redis_url)
    with redis.Redis.from_url(redis_url) as r:
        with _publisher(app, True) as publisher:
            publisher.publish(DEFAULT, _name(), [{"t": p.CAST}])
            addr = _addr(_kept(publisher))
            assert addr in {c["addr"] for c in r.client_list()}
        wait_for(lambda: addr not in {c["addr"] for c in r.client_list()}, 5, 0.01,
                 "the kept connection outlived close")


def test_the_wire_packs_its_commands_as_redis_py_does(redis_url: str) -> None:
    # One bytes for the whole write, the same as redis-py's pack_commands joined (issue 15).
    conn = redis.Redis.from_url(redis_url).connection_pool.make_connection()
    commands: list[tuple[Any, ...]] = [
        ("LPUSH", "ns.node.w1@h\u00e9", b"x" * 70_000), ("EVALSHA", "ab" * 20, 1, "pfx:q", 120_000),
        ("PUBLISH", "/0.ns.bcast", bytearray(b"{}")), ("LPUSH", "q", b""),
    ]
    assert redis_wire.pack(commands) == b"".join(conn.pack_commands(commands))
    with pytest.raises(TypeError):
        redis_wire.pack([("LPUSH", "q", 1.5)])


def test_a_wire_whose_pool_encodes_otherwise_packs_through_redis_py(redis_url: str) -> None:
    app = _app(redis_url)
    name = _name()
    with _publisher(app, True, keep=lambda rk: 30.0) as publisher, redis.Redis.from_url(redis_url) as r:
        publisher.publish(DEFAULT, name, [{"t": p.CAST, "i": 0}])
        wire = _wire_of(publisher)
        assert wire._utf8
        wire._utf8 = False  # as for a pool of another encoding: redis-py's own packing
        publisher.publish(DEFAULT, name, [{"t": p.CAST, "i": 1}])
        assert _pushed(r, name) == [0, 1] and 0 < r.pttl(name) <= 30_000
        r.delete(name)
