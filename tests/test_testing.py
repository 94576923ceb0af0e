"""The embedded broker and the cluster harness, against real brokers and real workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu import Connection

from forseti_celery import Forseti
from forseti_celery.embedded import EmbeddedRedis, EmbeddedRedisError, broker_url_from_env
from forseti_celery.testing import ClusterError, WaitTimeout, WorkerProcess, wait_for
from tests import hardcoded_app
from tests.conftest import REDIS_HOST, REDIS_PORT, in_ci, reachable
from tests.helpers import fresh

ROOT = Path(__file__).resolve().parent.parent
HARNESS_APP = "tests.harness_app"
HARDCODED_APP = "tests.hardcoded_app"


def running(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [arg.decode() for arg in fh.read().split(b"\0") if arg]
    except OSError:
        return []


def send_task(broker_url: str, name: str, *args: object, queue: str | None = None) -> None:
    """Send task ``name`` through the broker, to ``queue`` if given."""
    client = Celery("harness-client", broker=broker_url)
    try:
        client.send_task(name, args, queue=queue)
    finally:
        client.close()


def own_queue() -> str:
    """A task queue name no concurrent test run consumes from (the shared ``celery`` queue might)."""
    return f"harness-{uuid.uuid4().hex[:8]}"


def pong(broker_url: str, hostnames: Iterable[str], timeout: float = 5.0) -> set[str]:
    """Hostnames, among ``hostnames``, that answer a Celery control ping through the broker."""
    destination = list(hostnames)
    client = Celery("harness-client", broker=broker_url)
    try:
        replies = client.control.ping(destination=destination, timeout=timeout, limit=len(destination))
    finally:
        client.close()
    return {name for reply in replies for name in reply}


# --- embedded Redis --------------------------------------------------------------------------


def test_embedded_redis_answers_and_stops() -> None:
    server = EmbeddedRedis()
    pid = server.pid
    assert pid is not None
    with redis.Redis(unix_socket_path=server.socket_path) as client:
        assert client.ping()
    assert server.url == f"redis+socket://{server.socket_path}"

    server.stop()
    server.stop()  # idempotent

    assert server.pid is None
    assert not running(pid)
    assert not os.path.exists(server.socket_path)


def test_embedded_redis_carries_kombu_messages_over_its_socket_url() -> None:
    with EmbeddedRedis() as server, Connection(server.url) as conn:
        queue = conn.SimpleQueue("forseti-harness-test")
        queue.put({"n": 1})
        message = queue.get(timeout=5)
        message.ack()
        queue.close()
    assert message.payload == {"n": 1}


@pytest.mark.parametrize("how", ["exits", "is_killed"])
def test_embedded_redis_dies_with_the_process_that_started_it(how: str) -> None:
    script = (
        "import os, signal, sys\n"
        "from forseti_celery.embedded import EmbeddedRedis\n"
        "server = EmbeddedRedis()\n"
        "print(server.pid, flush=True)\n"
        f"if {how == 'is_killed'}: os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    pid = int(result.stdout.split()[0])

    wait_for(lambda: not running(pid), 10, message=f"redis-server {pid} outlived its owner")


def test_embedded_redis_removes_directories_its_dead_predecessors_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale, young = tmp_path / "forseti-redis-stale", tmp_path / "forseti-redis-young"
    for path in (stale, young):
        path.mkdir()
        (path / "redis.log").write_text("")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))

    with EmbeddedRedis() as live:
        os.utime(live.socket_path.rsplit("/", 1)[0], (time.time() - 3600, time.time() - 3600))
        with EmbeddedRedis():
            assert not stale.exists()
            assert young.exists()
            assert os.path.exists(live.socket_path)


def test_broker_url_from_env_prefers_forseti_then_celery_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://celery//")
    assert broker_url_from_env() == ("amqp://celery//", None)
    monkeypatch.setenv("FORSETI_BROKER_URL", "redis://forseti/1")
    assert broker_url_from_env() == ("redis://forseti/1", None)


def test_broker_url_from_env_starts_embedded_redis_only_when_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORSETI_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    with pytest.raises(EmbeddedRedisError, match="FORSETI_BROKER_URL"):
        broker_url_from_env(default_embedded=False)

    url, server = broker_url_from_env()

    assert server is not None
    with server:
        assert url == server.url
        with Connection(url) as conn:
            conn.ensure_connection(max_retries=1)


# --- helpers ---------------------------------------------------------------------------------


def test_wait_for_returns_the_truthy_value_or_raises_at_the_deadline() -> None:
    assert wait_for(lambda: 42, timeout=1) == 42
    with pytest.raises(WaitTimeout, match="never true"):
        wait_for(lambda: 0, timeout=0.1, message=lambda: "never true")


def test_worker_that_cannot_load_its_app_fails_fast_with_its_log(tmp_path: Path, redis_url: str) -> None:
    worker = WorkerProcess("tests.no_such_module", "bad@harness", redis_url, tmp_path, pool="solo", cwd=ROOT)
    worker.start()

    with pytest.raises(ClusterError, match="exited with code") as info:
        worker.wait_ready(timeout=30)

    assert "no_such_module" in str(info.value)
    assert not worker.alive


# --- clusters of real workers ----------------------------------------------------------------


def test_cluster_starts_three_real_workers_and_leaves_no_orphans(forseti_cluster_factory, broker_url: str) -> None:
    cluster = forseti_cluster_factory(HARNESS_APP, n=3, pool="prefork", concurrency=2, broker_url=broker_url)
    hostnames = [w.hostname for w in cluster.workers]
    pool_children = {w.hostname: w.descendants() for w in cluster.workers}
    pids = [w.pid for w in cluster.workers] + [pid for pids in pool_children.values() for pid in pids]

    assert [h.split("-")[0] for h in hostnames] == ["w1", "w2", "w3"]
    assert len({h.split("@")[0].split("-")[1] for h in hostnames}) == 1  # one tag per cluster
    assert pong(broker_url, hostnames) == set(hostnames)
    assert all(len(children) == 2 for children in pool_children.values()), pool_children

    assert cluster.stop() == []
    assert [pid for pid in pids if running(pid)] == []


def test_cluster_defaults_to_the_embedded_broker_and_its_workers_run_tasks(
    forseti_cluster_factory, forseti_embedded_broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FORSETI_BROKER_URL", raising=False)
    cluster = forseti_cluster_factory(HARNESS_APP, n=1, pool="solo")
    (worker,) = cluster.workers
    assert cluster.broker_url == forseti_embedded_broker

    send_task(cluster.broker_url, "harness.add", 2, 3)

    done = re.compile(r"Task harness\.add\[[^]]+\] succeeded in [0-9.e+-]+s: 5")  # 9.4e-05s too
    # 60 s: the worker may still be starting (its start-up took 20 s once on a loaded machine).
    wait_for(lambda: done.search(worker.log_text()), 60, message=lambda: f"task not run:\n{worker.log_tail()}")


def test_killed_worker_is_reported_dead(forseti_cluster_factory, redis_url: str) -> None:
    cluster = forseti_cluster_factory(HARNESS_APP, n=2, pool="solo", broker_url=redis_url)
    w1, w2 = cluster.workers

    w1.kill()

    assert not w1.alive
    assert w1.returncode == -signal.SIGKILL
    assert cluster.alive == [w2]
    assert pong(redis_url, [w1.hostname, w2.hostname], timeout=1.0) == {w2.hostname}


def test_added_worker_gets_the_next_name_and_joins(forseti_cluster_factory, redis_url: str) -> None:
    cluster = forseti_cluster_factory(HARNESS_APP, n=1, pool="solo", broker_url=redis_url)

    added = cluster.add_worker()

    assert added.hostname.startswith(f"w2-{cluster.tag}@")
    assert pong(redis_url, [added.hostname]) == {added.hostname}


def test_orphans_left_by_workers_are_reported_and_killed(forseti_cluster_factory, redis_url: str) -> None:
    queue = own_queue()
    cluster = forseti_cluster_factory(HARNESS_APP, n=1, pool="solo", broker_url=redis_url, extra_args=["-Q", queue])
    (worker,) = cluster.workers
    send_task(redis_url, "harness.spawn_sleeper", 300, queue=queue)
    sleepers = wait_for(lambda: [p for p in worker.descendants() if cmdline(p)[:1] == ["sleep"]], 20)

    orphans = cluster.stop(orphan_grace=0.5)

    assert orphans == sleepers
    wait_for(lambda: not any(running(pid) for pid in sleepers), 5)


def members(forseti: Forseti, n: int) -> set[str]:
    """The workers ``forseti``'s leader lists, once it lists ``n`` of them."""

    def listed() -> set[str] | None:
        try:
            found = set(forseti.get_metrics(timeout=2))
        except Exception:
            return None
        return found if len(found) == n else None

    return wait_for(listed, 30, 0.1, f"the leader of {forseti.settings.namespace!r} never listed {n} workers")


def test_cluster_of_an_app_naming_its_broker_runs_on_the_fixture_broker_and_its_client_speaks_its_namespace(
    forseti_cluster_factory, broker_url: str
) -> None:
    if not reachable(REDIS_HOST, REDIS_PORT):  # the app's own broker, where its "real" cluster runs
        if in_ci():
            pytest.fail(f"CI=true but Redis is not reachable on {REDIS_HOST}:{REDIS_PORT}")
        pytest.skip("the app's hard-coded broker (local Redis) is not reachable")
    real = forseti_cluster_factory(HARDCODED_APP, n=1, broker_url=hardcoded_app.BROKER_URL)
    test = forseti_cluster_factory(HARDCODED_APP, n=2, broker_url=broker_url)

    assert test.app.conf.broker_url == broker_url
    assert test.forseti.settings.namespace == hardcoded_app.NAMESPACE
    assert test.forseti.settings.spares == 1  # Forseti(app, spares=1) carries over
    assert members(test.forseti, 2) == {w.hostname for w in test.workers}
    assert members(real.forseti, 1) == {real.workers[0].hostname}
    ref = test.forseti.get_key(fresh("counter"), [10])
    ref.send(5)
    assert ref.call("get") == 15
    assert ref.node in {w.hostname for w in test.workers}
    ref.stop()


def test_plugin_adds_worker_logs_to_failures_and_fails_tests_that_leave_orphans(
    pytester: pytest.Pytester, redis_url: str
) -> None:
    queue = own_queue()
    pytester.makepyfile(
        f"""
        from celery import Celery
        from forseti_celery.testing import wait_for

        def make(factory):
            return factory({HARNESS_APP!r}, n=1, pool="solo", broker_url={redis_url!r}, cwd={str(ROOT)!r},
                           orphan_grace=0.5, extra_args=["-Q", {queue!r}])

        def test_failing(forseti_cluster_factory):
            make(forseti_cluster_factory)
            assert False, "inner failure"

        def test_leaving_an_orphan(forseti_cluster_factory):
            (worker,) = make(forseti_cluster_factory).workers
            client = Celery("c", broker={redis_url!r})
            client.send_task("harness.spawn_sleeper", (300,), queue={queue!r})
            client.close()
            wait_for(lambda: len(worker.descendants()) == 1, 20)
        """
    )

    result = pytester.runpytest("-p", "no:cacheprovider")

    result.assert_outcomes(failed=1, passed=1, errors=1)
    result.stdout.fnmatch_lines(["*_ test_failing _*", "*inner failure*", "*forseti worker logs*", "*w1-*@* ready.*"])
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaving_an_orphan*", "*left orphan processes*"])
