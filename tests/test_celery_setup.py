"""pytest-celery's ``celery_setup`` on forseti's local workers, as a user's test suite opts in to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import hardcoded_app

ROOT = Path(__file__).resolve().parent.parent

CONFTEST = """
import pytest

pytest_plugins = ["forseti_celery.testing.celery_setup"]


@pytest.fixture
def forseti_app_module():
    return "tests.hardcoded_app"


@pytest.fixture
def forseti_broker_url():
    return {broker_url!r}


@pytest.fixture
def forseti_workers():
    return 2


@pytest.fixture
def forseti_cluster_options():
    return {{"cwd": {root!r}}}
"""

USER_TESTS = """
import time

from pytest_celery import CeleryTestSetup, CeleryWorkerCluster

from forseti_celery import ForsetiError
from forseti_celery.testing import wait_for
from forseti_celery.testing.celery_setup import LocalWorkerNode, NodeOperationUnsupported


def members(forseti):
    try:
        return set(forseti.get_metrics(timeout=2))
    except ForsetiError:  # between two leaders
        return None


def test_celery_setup_runs_forseti_workers_and_pytest_celery_assertions_hold(celery_setup):
    assert isinstance(celery_setup, CeleryTestSetup)
    assert isinstance(celery_setup.worker_cluster, CeleryWorkerCluster)
    assert celery_setup.ready(ping=True, control=True, docker=True)
    first, second = celery_setup.worker_cluster
    hostnames = {{first.hostname(), second.hostname()}}
    assert isinstance(first, LocalWorkerNode)
    assert first.hostname() == first.worker.hostname and first.hostname().startswith(f"{{first.worker_name}}@")
    assert first.app is celery_setup.app and celery_setup.broker.app is celery_setup.app
    assert celery_setup.app.conf.broker_url == {broker_url!r}
    assert celery_setup.broker.config()["url"] == {broker_url!r}
    first.assert_log_exists(f"{{first.hostname()}} ready.")
    first.assert_log_exists(f"forseti: registry of {{first.hostname()}} started")
    first.assert_log_does_not_exist("Traceback", timeout=1)
    assert first.container.status == "running"

    forseti = celery_setup.forseti
    assert forseti.settings.namespace == {namespace!r}
    wait_for(lambda: members(forseti) == hostnames, 30, 0.2)
    ref = forseti.get_key(f"setup-{{time.monotonic_ns()}}", [10])
    ref.send(5)
    assert ref.call("get") == 15
    assert ref.node in hostnames
    assert celery_setup.ping.s().apply_async(queue=first.worker_queue).get(timeout=20) == "pong"

    pids = {{p["pid"] for p in first.get_running_processes_info(["pid", "name"])}}
    assert first.worker.pid in pids and len(pids) > 1  # the worker, its pool, forseti's zygote and spares
    code, output = first.container.exec_run("echo $FORSETI_BROKER_URL")
    assert (code, output.strip().decode()) == (0, {broker_url!r})

    second.restart()
    assert second.logs().count(f"{{second.hostname()}} ready.") == 2
    first.kill()
    assert first.container.status == "exited"
    wait_for(lambda: members(forseti) == {{second.hostname()}}, 30, 0.2)
    try:
        celery_setup.broker.restart()
    except NodeOperationUnsupported:
        pass
    else:
        raise AssertionError("a shared broker was restarted")
"""


def test_a_users_celery_setup_test_runs_on_forseti_workers_of_its_app(
    pytester: pytest.Pytester, broker_url: str
) -> None:
    pytester.makeconftest(CONFTEST.format(broker_url=broker_url, root=str(ROOT)))
    pytester.makepyfile(test_user=USER_TESTS.format(broker_url=broker_url, namespace=hardcoded_app.NAMESPACE))

    result = pytester.runpytest("-p", "no:cacheprovider", "-q")

    result.assert_outcomes(passed=1)
