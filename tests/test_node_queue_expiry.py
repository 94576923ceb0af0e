"""Redis node queues expire like RabbitMQ's (``x-expires``): a gone worker's list does not
collect sends forever, and a live worker's list never expires under it."""

from __future__ import annotations

import signal
from pathlib import Path

import redis
from celery import Celery

from forseti_celery.core.broker import Publisher
from forseti_celery.core.protocol import NODE_QUEUE_EXPIRES, Names
from forseti_celery.testing import wait_for

from .helpers import fresh, harness
from .test_safety import in_process_node


def _ttl(redis_url: str, name: str) -> float:
    """Seconds ``name`` has left; -1: no TTL, -2: no such list."""
    with redis.Redis.from_url(redis_url) as r:
        ms = int(r.pttl(name))
    return ms / 1000 if ms >= 0 else float(ms)


def test_sends_to_a_gone_workers_queue_leave_a_list_that_expires(redis_url: str, tmp_path: Path) -> None:
    with harness(redis_url, tmp_path, n=2) as h:
        ref = h.forseti.get_key(fresh("gone"), timeout=10)
        victim = next(w for w in h.cluster.workers if w.hostname == ref.node)
        victim.kill(signal.SIGKILL)
        wait_for(lambda: ref.node not in h.forseti.get_metrics(timeout=5), 20, 0.2,
                 "the leader never dropped the worker")
        for i in range(2000):
            ref.send(i)
        h.forseti.client._sender.flush()
        queue = h.forseti.names.node_routing_key(ref.node)
        ttl = wait_for(lambda: [t for t in [_ttl(redis_url, queue)] if t != -2], 10, 0.05,
                       "the gone worker's list never appeared")[0]
        print(f"\ngone worker's list: TTL {ttl:.1f} s after 2000 sends")
        assert 0 < ttl <= NODE_QUEUE_EXPIRES  # -1 before: it never expired


def test_a_live_workers_backlog_outlives_its_wait_and_is_all_delivered(redis_url: str, tmp_path: Path) -> None:
    with harness(redis_url, tmp_path, n=1) as h:
        ref = h.forseti.get_key(fresh("backlog"), timeout=10)
        worker = h.cluster.workers[0]
        queue = h.forseti.names.node_routing_key(ref.node)
        worker.kill(signal.SIGSTOP)  # its messages wait (well under its fencing time)
        try:
            for _ in range(50):  # 50 broker messages: a read pending when it stopped takes one
                ref.send("inc")
                h.forseti.client._sender.flush()
            ttl = _ttl(redis_url, queue)
        finally:
            worker.kill(signal.SIGCONT)
        print(f"\nlive worker's waiting list: TTL {ttl:.1f} s")
        assert NODE_QUEUE_EXPIRES - 5 < ttl <= NODE_QUEUE_EXPIRES
        assert wait_for(lambda: ref.call("get", timeout=5) == 50, 20, 0.1, "the backlog was not all delivered")


def test_a_consumer_raises_its_own_lists_ttl_and_a_push_never_lowers_it(redis_url: str) -> None:
    app = Celery("keep", broker=redis_url, set_as_current=False)
    names = Names(fresh("keep"), single_active_consumer=False)
    publisher = Publisher(app.connection_for_write(), keep=names.queue_ttl)
    queue = names.node_routing_key("w@h")
    try:
        publisher.publish(names.exchange, queue, [{"t": "cast"}])
        assert 0 < _ttl(redis_url, queue) <= NODE_QUEUE_EXPIRES
        with redis.Redis.from_url(redis_url) as r:
            r.pexpire(queue, 1000)  # a backlog that outlived its last push by almost the whole TTL
        publisher.keep_alive(queue)  # what its worker does every heartbeat
        assert _ttl(redis_url, queue) > NODE_QUEUE_EXPIRES - 5
        publisher.publish_many(names.exchange, [(queue, [{"t": "cast"}]), (names.leader, [{"t": "ping"}])])
        assert _ttl(redis_url, queue) > NODE_QUEUE_EXPIRES - 5
        assert _ttl(redis_url, names.leader) == -1  # leader requests expire by their own deadlines only
        publisher.keep_alive(names.node_routing_key("nobody@h"))  # no list: nothing is created
        assert _ttl(redis_url, names.node_routing_key("nobody@h")) == -2
    finally:
        with redis.Redis.from_url(redis_url) as r:
            r.delete(queue, names.leader)
        publisher.close()


def test_a_workers_report_outlives_the_short_deadline_of_a_client_request_pushed_before_it(redis_url: str) -> None:
    node = in_process_node(redis_url)
    names = node.names
    client = Publisher(Celery("client", broker=redis_url, set_as_current=False).connection_for_write(),
                       keep=names.queue_ttl)
    try:
        # A client's request that stops mattering in 0.5 s: the leader list lives that long, no longer.
        client.publish(names.exchange, names.leader, [{"t": "search"}], declare=[names.leader_queue], expiration=0.5)
        assert 0 < _ttl(redis_url, names.leader) <= 0.5
        # A worker's report, pushed behind it (a leader busy or changing hands reads both later).
        node.publisher.publish_many(names.exchange, [(names.leader, [{"t": "exited"}]),
                                                     (names.node_routing_key("w@h"), [{"t": "cast"}])])
        node.publisher.publish(names.exchange, names.leader, [{"t": "spawned"}])
        ttl = _ttl(redis_url, names.leader)
        print(f"\nleader list after a 0.5 s request and two worker reports: TTL {ttl:.1f} s")
        assert ttl > NODE_QUEUE_EXPIRES - 5
    finally:
        with redis.Redis.from_url(redis_url) as r:
            r.delete(names.leader, names.node_routing_key("w@h"))
        client.close()
        node.publisher.close()
        node.election.close()
        node.events.close()
