"""Brokers for the whole suite: real Redis and RabbitMQ on loopback.

Locally, a missing Redis is replaced by an embedded one and a missing RabbitMQ skips its
tests; with ``CI=true`` either one missing fails the run, so CI can never pass by skipping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator

import kombu.pools
import pytest
import redis
from kombu import Connection

from forseti_celery.embedded import EmbeddedRedis

pytest_plugins = ["pytester"]

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
#: Databases a session may claim (the first free one; FORSETI_TEST_REDIS_DB forces one); never db 0.
REDIS_TEST_DBS = range(9, 16)
#: CLIENT SETNAME of the connection that holds a session's db.
REDIS_CLAIM_NAME = "forseti-test-session"
RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672
RABBITMQ_URL = f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}//"
#: Queues and exchanges whose names start with this are deleted at session start.
RABBITMQ_TEST_PREFIX = "forseti"


def in_ci() -> bool:
    """Whether the suite runs in CI, where a missing broker fails instead of skipping."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The local Redis (a test db of its own, flushed), else an embedded Redis; fails in CI if Redis is down."""
    if reachable(REDIS_HOST, REDIS_PORT):
        holder = _claim_test_db()
        try:
            yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{holder.connection_pool.connection_kwargs['db']}"
        finally:
            holder.close()
        return
    if in_ci():
        pytest.fail(f"CI=true but Redis is not reachable on {REDIS_HOST}:{REDIS_PORT}")
    with EmbeddedRedis() as server:
        yield server.url


def _claim_test_db() -> redis.Redis:
    """Flush and hold (one open connection, for the session) the first test db no client is on.

    Two suites running at once on this machine (two developers, or a developer and CI) would
    otherwise share queues, leases and worker names in one db and break each other.
    """
    dbs = [int(os.environ["FORSETI_TEST_REDIS_DB"])] if "FORSETI_TEST_REDIS_DB" in os.environ else REDIS_TEST_DBS
    with redis.Redis(host=REDIS_HOST, port=REDIS_PORT) as probe:
        busy = {int(c["db"]) for c in probe.client_list()}
    free = [db for db in dbs if db not in busy]
    if not free:
        pytest.fail(f"every Redis test db {list(dbs)} is in use by another client (a concurrent test run?)")
    holder = redis.Redis(
        host=REDIS_HOST, port=REDIS_PORT, db=free[0], client_name=REDIS_CLAIM_NAME, single_connection_client=True
    )
    holder.flushdb()
    return holder


def _rabbitmqctl_names(what: str) -> list[str]:
    """Names from ``rabbitmqctl list_<what> name`` that carry the test prefix ([] without it)."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return []
    result = subprocess.run(
        [ctl, "-q", "--no-table-headers", f"list_{what}", "name"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return [name for name in result.stdout.split() if name.startswith(RABBITMQ_TEST_PREFIX)]


def _delete_rabbitmq_leftovers(url: str) -> None:
    """Delete ``forseti*`` queues and exchanges left by earlier runs.

    ``if_unused`` spares those a concurrent run is using (queues with consumers, exchanges
    with bindings): the broker refuses to delete them, and the refusal is ignored.
    """
    queues, exchanges = _rabbitmqctl_names("queues"), _rabbitmqctl_names("exchanges")
    if not queues and not exchanges:
        return
    with Connection(url) as conn:
        for name in queues:
            # A failed delete closes the channel: use a fresh one each time.
            with contextlib.suppress(conn.channel_errors), conn.channel() as channel:
                channel.queue_delete(name, if_unused=True)
        for name in exchanges:
            with contextlib.suppress(conn.channel_errors), conn.channel() as channel:
                channel.exchange_delete(name, if_unused=True)


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """The local RabbitMQ (``forseti*`` leftovers deleted); skips locally, fails in CI if down."""
    if not reachable(RABBITMQ_HOST, RABBITMQ_PORT):
        message = f"RabbitMQ is not reachable on {RABBITMQ_HOST}:{RABBITMQ_PORT}"
        if in_ci():
            pytest.fail(f"CI=true but {message}")
        pytest.skip(message)
    _delete_rabbitmq_leftovers(RABBITMQ_URL)
    return RABBITMQ_URL


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each test using it runs once on Redis and once on RabbitMQ."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url



@pytest.fixture(autouse=True, scope="module")
def _fresh_kombu_pools() -> Iterator[None]:
    """Each test module starts with kombu's process-wide connection pools empty.

    Celery's ``app.pool`` (what ``app.control`` uses) is kombu's global pool for the broker URL,
    shared by every app of this process: a connection an earlier module left there, idle since, or on
    a broker a chaos test disturbed, would otherwise be the next module's first control connection
    (seen: ``ConnectionResetError`` on test_control's first RabbitMQ ``inspect`` after test_chaos).
    """
    kombu.pools.reset()
    yield
