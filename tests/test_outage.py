"""When nothing answers: a namespace nobody serves, and a broker that goes away for longer than the
retry budget (a TCP relay of our own in front of the real broker, cut and restored by the test: the
shared brokers themselves stay up for everyone else)."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from celery import Celery
from kombu import Connection

from forseti_celery import BrokerUnavailable, Forseti, ForsetiTimeout
from forseti_celery.core.protocol import Names
from forseti_celery.testing import Cluster, WorkerProcess, short_hostname, wait_for
from tests.helpers import fresh

#: Budget of the components whose broker the tests cut: a third failure within 30 s gives up.
MAX_RETRIES, MAX_TIME = 2, 30.0

_RELAY = """
import asyncio, sys

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()

async def relay(reader, writer):
    try:
        upstream = await asyncio.open_connection(sys.argv[2], int(sys.argv[3]))
    except OSError:
        writer.close()
        return
    await asyncio.gather(pipe(reader, upstream[1]), pipe(upstream[0], writer))

async def main():
    server = await asyncio.start_server(relay, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


class Relay:
    """A TCP relay process in front of a real broker: :meth:`cut` kills it (every connection
    through it drops, new ones are refused) and :meth:`restore` starts it again on its port."""

    def __init__(self, broker_url: str) -> None:
        parts = urlsplit(broker_url)
        if parts.port is None:
            pytest.skip(f"{broker_url} is not a TCP broker")
        self._target = (parts.hostname or "127.0.0.1", parts.port)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        #: The broker's URL through the relay.
        self.url = broker_url.replace(parts.netloc, parts.netloc.rsplit(":", 1)[0] + f":{self.port}", 1)
        self._proc: subprocess.Popen[bytes] | None = None

    def restore(self) -> Relay:
        self._proc = subprocess.Popen([sys.executable, "-c", _RELAY, str(self.port), *map(str, self._target)],
                                      stdout=subprocess.PIPE)
        assert self._proc.stdout is not None and self._proc.stdout.readline() == b"ready\n"
        return self

    def cut(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


def _leader_queue_length(broker_url: str, names: Names) -> int:
    """Messages waiting in the leader queue (0 once it is gone)."""
    if broker_url.startswith("redis"):
        with redis.Redis.from_url(broker_url) as r:
            return int(r.llen(names.leader))
    with Connection(broker_url) as conn, conn.channel() as channel:
        try:
            return int(channel.queue_declare(names.leader, passive=True).message_count)
        except conn.channel_errors:
            return 0


def _delete_leader_queue(broker_url: str, names: Names) -> None:
    if broker_url.startswith("redis"):
        with redis.Redis.from_url(broker_url) as r:
            r.delete(names.leader)
        return
    with Connection(broker_url) as conn, conn.channel() as channel:
        channel.queue_delete(names.leader)


def test_requests_nobody_answers_leave_the_leader_queue_with_their_deadline(broker_url: str) -> None:
    # A namespace without workers: get_key times out naming what it asked, and neither the first
    # request nor those re-sent every forseti_retry_interval stay in the leader queue after it.
    namespace = f"forseti-ghost-{uuid.uuid4().hex[:8]}"
    app = Celery("ghost", broker=broker_url, set_as_current=False)
    forseti = Forseti(app, namespace=namespace, retry_interval=0.3)
    try:
        with pytest.raises(ForsetiTimeout) as caught:
            forseti.get_key("k", timeout=1.5)
        message = str(caught.value)
        print(f"\n{message}")
        broker = Connection(broker_url).as_uri()
        assert "no leader answered" in message and repr(namespace) in message and broker in message
        assert "guest:guest" not in message
        wait_for(lambda: _leader_queue_length(broker_url, forseti.names) == 0, 10, 0.1,
                 lambda: f"{_leader_queue_length(broker_url, forseti.names)} requests still in the leader queue")
    finally:
        forseti.close()
        _delete_leader_queue(broker_url, forseti.names)


def test_a_client_answers_again_once_the_broker_is_back_from_an_outage_past_its_retry_budget(
    broker_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # While the broker is away callers get BrokerUnavailable; the reply thread gives up past
    # forseti_max_retries/forseti_max_time; once the broker is back a new one serves the same client.
    namespace = f"forseti-outage-{uuid.uuid4().hex[:8]}"
    relay = Relay(broker_url).restore()
    app = Celery("outage-client", broker=relay.url, set_as_current=False)
    app.conf.update(forseti_namespace=namespace, forseti_max_retries=MAX_RETRIES, forseti_max_time=MAX_TIME)
    forseti = Forseti(app)
    try:
        with Cluster("tests.app", 1, broker_url=broker_url, log_dir=tmp_path, env={"FORSETI_NAMESPACE": namespace}):
            key = fresh("before")
            assert forseti.get_key(key, timeout=30).call("key") == key

            relay.cut()
            wait_for(lambda: "forseti-client gave up" in caplog.text, 60, 0.1, "the reply thread never gave up")
            with pytest.raises(BrokerUnavailable):
                forseti.get_key(fresh("away"), timeout=5)

            relay.restore()
            key = fresh("after")
            ref = forseti.get_key(key, timeout=30)
            assert ref.call("key") == key
    finally:
        forseti.close()
        relay.cut()


def test_a_worker_whose_registry_fails_past_its_retry_budget_stops_loudly(broker_url: str, tmp_path: Path) -> None:
    # Cut off for longer than forseti_max_retries/forseti_max_time, the registry's thread gives
    # up: the worker must not go on quietly without it, but stop with a CRITICAL log and exit code 1.
    relay = Relay(broker_url).restore()
    hostname = f"outage-{uuid.uuid4().hex[:6]}@{short_hostname()}"
    worker = WorkerProcess("tests.outage_app", hostname, relay.url, tmp_path, pool="solo",
                           env={"FORSETI_NAMESPACE": f"forseti-outage-{uuid.uuid4().hex[:8]}"})
    try:
        worker.start().wait_ready()
        relay.cut()
        wait_for(lambda: not worker.alive, 90, 0.2, lambda: f"the worker still runs; log:\n{worker.log_tail()}")
        log = worker.log_text()
        print(f"\nexit code {worker.returncode}; log tail:\n{worker.log_tail(8)}")
        assert worker.returncode == 1, worker.log_tail()
        assert "CRITICAL" in log and f"stopping worker {hostname}" in log and "forseti_max_retries" in log
    finally:
        worker.stop(timeout=10)
        relay.cut()
