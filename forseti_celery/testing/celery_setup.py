"""pytest-celery's ``celery_setup`` on forseti's local workers: an opt-in pytest plugin.

pytest-celery 1.x builds its nodes on Docker containers. Here the same node API
(:class:`~pytest_celery.CeleryTestWorker`, :class:`~pytest_celery.CeleryTestBroker`,
:class:`~pytest_celery.CeleryTestBackend`, their clusters and
:class:`~pytest_celery.CeleryTestSetup`) is backed by local ``celery worker`` processes of
your app (a :class:`~forseti_celery.testing.Cluster`) and by brokers the test did not start
(the local Redis or RabbitMQ, or the session's embedded Redis). Enable it in your rootdir's
``conftest.py``::

    pytest_plugins = ["forseti_celery.testing.celery_setup"]

    @pytest.fixture
    def forseti_app_module():
        return "proj"           # what `celery -A` takes

Then ``def test_x(celery_setup): ...`` gets forseti workers. What needs a container engine
and is not offered is listed in ``docs/testing.rst``.
"""

from __future__ import annotations

import signal as signals
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import celery
import pytest
from celery import Celery, current_app
from kombu import Connection
from kombu.utils.url import maybe_sanitize_url
from pytest_celery import (
    CeleryBackendCluster,
    CeleryBrokerCluster,
    CeleryTestBackend,
    CeleryTestBroker,
    CeleryTestSetup,
    CeleryTestWorker,
    CeleryWorkerCluster,
)

from ..app import Forseti
from ..core.errors import ForsetiError
from . import _default_broker_url
from .cluster import Cluster
from .processes import WorkerProcess, descendants_of

__all__ = [
    "ForsetiTestSetup",
    "LocalBackendNode",
    "LocalBrokerNode",
    "LocalService",
    "LocalWorker",
    "LocalWorkerNode",
    "NodeOperationUnsupported",
]

#: Imported by every worker: pytest-celery's own tasks (``ping`` for ``ready(ping=True)``, ``add`` …).
PYTEST_CELERY_TASKS = "pytest_celery.vendors.worker.tasks"


class NodeOperationUnsupported(ForsetiError, NotImplementedError):
    """Raised when a pytest-celery node operation needs a container the local node does not have."""


class ExecResult(NamedTuple):
    """What docker's ``Container.exec_run`` returns."""

    exit_code: int
    output: bytes


def _signal_number(sig: str | int) -> int:
    return int(signals.Signals[sig]) if isinstance(sig, str) else sig


# --- what the nodes ask of a container ---------------------------------------------------------


class LocalWorker:
    """The container side of a :class:`LocalWorkerNode`: one :class:`WorkerProcess`.

    Answers what pytest-celery's nodes ask of their container: ``logs()``, ``ready()``,
    ``status``, ``kill()``, ``restart()``, ``reload()``, ``exec_run()``, ``teardown()`` …
    """

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker

    @property
    def name(self) -> str:
        """The worker's Celery hostname."""
        return self.worker.hostname

    @property
    def id(self) -> str:
        """The worker's Celery hostname (a container's id elsewhere)."""
        return self.worker.hostname

    @property
    def status(self) -> str:
        """``"running"`` or ``"exited"``, as docker says it."""
        return "running" if self.worker.alive else "exited"

    @property
    def celeryconfig(self) -> dict[str, Any]:
        """The broker and result backend the worker uses."""
        return {"url": self.worker.broker_url, "host_url": self.worker.broker_url,
                "result_backend": self.worker.result_backend}  # fmt: skip

    def logs(self) -> str:
        """Everything the worker has logged (all runs, if it was restarted)."""
        return self.worker.log_text()

    def ready(self) -> bool:
        """Wait until the worker logs ``<hostname> ready.`` (raises if it exits first)."""
        self.worker.wait_ready()
        return True

    def reload(self) -> None:
        """Nothing to reload: the state is read from the process each time."""

    def kill(self, signal: str | int = "SIGKILL") -> None:
        """Send ``signal`` (a name or a number) to the worker's main process."""
        self.worker.kill(_signal_number(signal))

    def restart(self, timeout: float = 15.0) -> None:
        """Warm shutdown, then a new process under the same name, waited on until ready."""
        self.worker.restart(timeout)

    def exec_run(self, cmd: str | list[str], **kw: Any) -> ExecResult:
        """Run ``cmd`` where the worker runs: its working directory and environment (its orphan marker too)."""
        result = subprocess.run(
            cmd, shell=isinstance(cmd, str), cwd=self.worker.cwd, env=self.worker.environ,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
        return ExecResult(result.returncode, result.stdout)

    def teardown(self) -> None:
        """Stop the worker (its cluster checks for orphans at the test's teardown)."""
        self.worker.stop()

    def version(self) -> str:
        """The Celery version the worker runs: this environment's."""
        return str(celery.__version__)

    def log_level(self) -> str:
        """The worker's log level."""
        return "INFO"

    def worker_name(self) -> str:
        """The worker's name: its hostname before the ``@``."""
        return self.worker.hostname.split("@", 1)[0]


class LocalService:
    """The container side of a broker or result backend node: a service the test did not start.

    It has a URL and answers ``ready()``; it has no logs of its own here, and cannot be
    killed or restarted (:class:`NodeOperationUnsupported`).
    """

    def __init__(self, url: str) -> None:
        self.url = url

    @property
    def name(self) -> str:
        """The service's URL, without its password."""
        return str(maybe_sanitize_url(self.url))

    @property
    def id(self) -> str:
        """Host name of the service (the path of a unix socket)."""
        parts = urlsplit(self.url)
        return parts.hostname or parts.path or self.url

    @property
    def status(self) -> str:
        """Always ``"running"``: the service is not this node's to stop."""
        return "running"

    @property
    def celeryconfig(self) -> dict[str, Any]:
        """pytest-celery's ``url`` and ``host_url``: both the service's URL."""
        return {"url": self.url, "host_url": self.url}

    @property
    def _is_broker(self) -> bool:
        return not self.url.startswith("rpc:")

    def logs(self) -> str:
        """Nothing: a service the test did not start has no log here."""
        return ""

    def ready(self) -> bool:
        """Whether the broker accepts a connection (``rpc://`` rides on the broker: always)."""
        if not self._is_broker:
            return True
        with Connection(self.url) as conn:
            conn.ensure_connection(max_retries=1)
        return True

    def reload(self) -> None:
        """Nothing to reload."""

    def kill(self, signal: str | int = "SIGKILL") -> None:
        """Refused: the service is shared, not started for the test."""
        raise NodeOperationUnsupported(f"{self.name} was not started by the test: it cannot be killed here")

    def restart(self, timeout: float = 0) -> None:
        """Refused: the service is shared, not started for the test."""
        raise NodeOperationUnsupported(f"{self.name} was not started by the test: it cannot be restarted here")

    def exec_run(self, cmd: str | list[str], **kw: Any) -> ExecResult:
        """Refused: there is no container to run ``cmd`` in."""
        raise NodeOperationUnsupported(f"{self.name} is not a container: nothing to exec {cmd!r} in")

    def teardown(self) -> None:
        """Nothing to tear down."""


# --- nodes and setup ---------------------------------------------------------------------------


class LocalWorkerNode(CeleryTestWorker):  # type: ignore[misc]
    """A pytest-celery worker node backed by a local ``celery worker`` process."""

    container: LocalWorker

    def __init__(self, worker: WorkerProcess, app: Celery) -> None:
        super().__init__(LocalWorker(worker), app)

    @property
    def worker(self) -> WorkerProcess:
        """The local worker process."""
        return self.container.worker

    @property
    def worker_queue(self) -> str:
        """The queue the worker's app sends tasks to by default (the worker consumes it)."""
        return str(self.app.conf.task_default_queue)

    def hostname(self) -> str:
        """The worker's Celery hostname, as in ``celery inspect`` (``w1-ab12@host``)."""
        return self.worker.hostname

    def get_running_processes_info(
        self, columns: list[str] | None = None, filters: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """pytest-celery's process listing, of the worker's own process tree (psutil columns)."""
        import psutil  # type: ignore[import-untyped]

        columns = columns or ["pid", "name", "username", "cmdline", "cpu_percent", "memory_percent", "create_time"]
        pids = [self.worker.pid, *descendants_of(self.worker.pid)] if self.worker.alive else []
        found = []
        for pid in pids:
            try:
                found.append(psutil.Process(pid).as_dict(columns))
            except psutil.NoSuchProcess:
                continue
        return [item for item in found if all(item.get(k) == v for k, v in (filters or {}).items())]


class _LocalServiceNode:
    """What the broker and backend nodes share: a :class:`LocalService` for a container."""

    container: LocalService

    def __init__(self, url: str, app: Celery | None = None) -> None:
        super().__init__(LocalService(url), app)  # type: ignore[call-arg]

    def hostname(self) -> str:
        """The service's host (or unix socket path)."""
        return self.container.id


class LocalBrokerNode(_LocalServiceNode, CeleryTestBroker):  # type: ignore[misc]
    """A pytest-celery broker node for a broker the test did not start (local or embedded)."""


class LocalBackendNode(_LocalServiceNode, CeleryTestBackend):  # type: ignore[misc]
    """A pytest-celery result backend node for a backend the test did not start."""


class ForsetiTestSetup(CeleryTestSetup):  # type: ignore[misc]
    """pytest-celery's setup whose ``app`` is a copy of your app on the test's broker, with ``forseti``."""

    @property
    def forseti(self) -> Forseti:
        """The ``Forseti`` of :attr:`app`: your app's namespace and settings, the test's broker."""
        return Forseti.of(self.app)


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def forseti_app_module() -> str:
    """The app the workers run, as ``celery -A`` takes it (``"proj"``): override it."""
    pytest.fail("override the fixture forseti_app_module to name your app (what `celery -A` takes)", pytrace=False)


@pytest.fixture
def forseti_workers() -> int:
    """How many workers the ``celery_setup`` cluster has (1; override for more)."""
    return 1


@pytest.fixture
def forseti_cluster_options() -> Mapping[str, Any]:
    """Keyword arguments of :class:`~forseti_celery.testing.Cluster` (``pool``, ``env``, ``extra_args`` …)."""
    return {}


@pytest.fixture
def forseti_broker_url(request: pytest.FixtureRequest) -> str:
    """The broker of the setup: ``$FORSETI_BROKER_URL``, else the session's embedded Redis."""
    return _default_broker_url(request)


@pytest.fixture
def forseti_result_backend(forseti_broker_url: str) -> str:
    """The result backend of the setup: the broker itself on Redis, ``rpc://`` on RabbitMQ."""
    return forseti_broker_url if forseti_broker_url.startswith("redis") else "rpc://"


@pytest.fixture
def forseti_celery_cluster(
    forseti_cluster_factory: Any,
    forseti_app_module: str,
    forseti_workers: int,
    forseti_cluster_options: Mapping[str, Any],
    forseti_broker_url: str,
    forseti_result_backend: str,
) -> Cluster:
    """The started :class:`~forseti_celery.testing.Cluster` behind ``celery_setup``'s workers."""
    options = dict(forseti_cluster_options)
    options["extra_args"] = ["--include", PYTEST_CELERY_TASKS, *options.get("extra_args", ())]
    cluster: Cluster = forseti_cluster_factory(
        forseti_app_module, forseti_workers, broker_url=forseti_broker_url, result_backend=forseti_result_backend,
        **options,
    )  # fmt: skip
    return cluster


@pytest.fixture
def celery_broker(forseti_broker_url: str) -> LocalBrokerNode:
    """The setup's broker node (pytest-celery's fixture, not parametrized over containers)."""
    return LocalBrokerNode(forseti_broker_url)


@pytest.fixture
def celery_backend(forseti_result_backend: str) -> LocalBackendNode:
    """The setup's result backend node."""
    return LocalBackendNode(forseti_result_backend)


@pytest.fixture
def celery_broker_cluster(celery_broker: LocalBrokerNode) -> CeleryBrokerCluster:
    """The setup's broker cluster: one local broker node."""
    return CeleryBrokerCluster(celery_broker)


@pytest.fixture
def celery_backend_cluster(celery_backend: LocalBackendNode) -> CeleryBackendCluster:
    """The setup's result backend cluster: one local node."""
    return CeleryBackendCluster(celery_backend)


@pytest.fixture
def celery_worker_cluster(forseti_celery_cluster: Cluster) -> CeleryWorkerCluster:
    """Every worker of the setup's forseti cluster, as pytest-celery worker nodes."""
    return CeleryWorkerCluster(
        *(LocalWorkerNode(w, forseti_celery_cluster.app) for w in forseti_celery_cluster.workers)
    )


@pytest.fixture
def celery_worker(celery_worker_cluster: CeleryWorkerCluster) -> CeleryTestWorker:
    """The setup's first worker node."""
    return celery_worker_cluster[0]


@pytest.fixture
def celery_setup_app(forseti_celery_cluster: Cluster) -> Iterator[Celery]:
    """The cluster's copy of your app, current for the test (as pytest-celery's own app is)."""
    previous = current_app._get_current_object()
    app = forseti_celery_cluster.app
    app.set_current()
    yield app
    previous.set_current()


@pytest.fixture
def celery_setup_cls() -> type[CeleryTestSetup]:
    """:class:`ForsetiTestSetup`."""
    return ForsetiTestSetup
