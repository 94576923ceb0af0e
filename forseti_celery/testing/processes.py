"""A cluster of real ``celery worker`` processes for tests, and the pytest plugin around it.

:class:`Cluster` starts N :class:`WorkerProcess` es (each a ``python -m celery worker``
subprocess logging to its own file) and, on :meth:`Cluster.stop`, finds every process any of
them left behind. Each worker is started with a private marker in its environment, which its
forked children inherit; after shutdown, any live process still carrying the marker is an
orphan, found even after it was re-parented to init.

The pytest plugin (registered through the ``pytest11`` entry point) adds two fixtures:

* ``forseti_embedded_broker`` (session): the URL of an embedded Redis started once per session.
* ``forseti_cluster_factory``: ``make(app_module, n=3, pool="prefork", broker_url=None, **kw)``
  returns a started :class:`Cluster`, whose workers use the cluster's broker whatever the app
  names in its code, and whose :attr:`Cluster.forseti` is a client of the app's namespace on
  that broker; every cluster is stopped at teardown, and the test errors if a cluster left
  orphans. When a test fails, the workers' log tails are added to its report.

This module is imported by pytest for every run: keep its imports light.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from .errors import ForsetiError

if TYPE_CHECKING:
    from celery import Celery

    from .app import Forseti

__all__ = [
    "Cluster",
    "ClusterError",
    "WaitTimeout",
    "WorkerProcess",
    "client_app",
    "load_app",
    "wait_for",
]

T = TypeVar("T")

#: Environment variable whose value marks every process a harness worker started.
MARKER_ENV = "FORSETI_TESTING_MARKER"


class ClusterError(ForsetiError, RuntimeError):
    """Raised when a worker does not become ready, or exits while being waited on."""


class WaitTimeout(AssertionError):
    """Raised by :func:`wait_for` when the condition is still false at the deadline."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy value.

    Returns that value; raises :class:`WaitTimeout` with ``message`` (a string or a callable
    building one, for state read at the deadline) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise WaitTimeout(f"{text} (waited {timeout} s)")
        time.sleep(interval)


# --- /proc helpers (Linux) -----------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """``(ppid, state)`` of ``pid`` from ``/proc/<pid>/stat``, or ``None`` if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            data = fh.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = data[data.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _is_running(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")


def descendants_of(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for candidate in _all_pids():
        stat = _proc_stat(candidate)
        if stat is not None and stat[1] not in ("Z", "X"):
            children.setdefault(stat[0], []).append(candidate)
    found: list[int] = []
    todo = list(children.get(pid, ()))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, ()))
    return sorted(found)


def marked_pids(marker: str) -> list[int]:
    """Pids of live processes whose initial environment holds ``MARKER_ENV=<marker>...``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for pid in _all_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                environ = fh.read().split(b"\0")
        except OSError:
            continue
        if any(entry.startswith(needle) for entry in environ) and _is_running(pid):
            found.append(pid)
    return sorted(found)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --- one worker ------------------------------------------------------------------------------


class WorkerProcess:
    """One real ``celery worker`` subprocess, logging stdout and stderr to ``<log_dir>/<name>.log``."""

    def __init__(
        self,
        app_module: str,
        hostname: str,
        broker_url: str,
        log_dir: str | os.PathLike[str],
        *,
        pool: str = "prefork",
        concurrency: int = 1,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        marker: str | None = None,
        result_backend: str | None = None,
    ) -> None:
        self.app_module = app_module
        self.hostname = hostname
        self.broker_url = broker_url
        self.result_backend = result_backend
        self.pool = pool
        self.concurrency = concurrency
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.cwd = cwd
        #: Inherited by every process this worker forks; see :func:`marked_pids`.
        self.marker = marker or uuid.uuid4().hex
        self.log_path = Path(log_dir) / f"{hostname.replace('@', '_')}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        """The worker's command line.

        ``-b`` (and ``--result-backend``) win over what the app names in its code: Celery turns
        them into ``CELERY_BROKER_URL`` (``CELERY_RESULT_BACKEND``), read before the app's conf.
        """
        backend = ["--result-backend", self.result_backend] if self.result_backend else []
        return [
            sys.executable, "-m", "celery", "-A", self.app_module, "-b", self.broker_url, *backend, "worker",
            "-n", self.hostname, "-P", self.pool, "-c", str(self.concurrency), "-l", "INFO",
            *self.extra_args,
        ]  # fmt: skip

    @property
    def pid(self) -> int:
        """Process id of the worker's main process."""
        return self._proc_or_fail().pid

    @property
    def returncode(self) -> int | None:
        """Exit code (negative signal number if killed), or ``None`` while it runs."""
        return None if self._proc is None else self._proc.poll()

    @property
    def alive(self) -> bool:
        """Whether the worker's main process is running."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> WorkerProcess:
        """Start the worker process (does not wait for it to be ready)."""
        if self._proc is not None:
            raise ClusterError(f"worker {self.hostname} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "FORSETI_BROKER_URL": self.broker_url,
            "PYTHONUNBUFFERED": "1",
            **self.env,
            # An app's own broker_read_url / broker_write_url would win over ``-b``; these do not.
            "CELERY_BROKER_READ_URL": self.broker_url,
            "CELERY_BROKER_WRITE_URL": self.broker_url,
            MARKER_ENV: f"{self.marker}:{self.hostname}",
        }
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
            self._proc = subprocess.Popen(
                self.argv,
                env=env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def log_text(self) -> str:
        """Everything the worker has written so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the worker's log."""
        return _tail(self.log_text(), lines)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the worker logs ``<hostname> ready.``.

        Raises :class:`ClusterError` with the log tail if it exits first or ``timeout`` passes.
        """
        ready = re.compile(rf"\b{re.escape(self.hostname)} ready\.")
        deadline = time.monotonic() + timeout
        while not ready.search(self.log_text()):
            if not self.alive:
                raise ClusterError(
                    f"worker {self.hostname} exited with code {self.returncode} before "
                    f"it was ready; log tail:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise ClusterError(f"worker {self.hostname} not ready within {timeout} s; log tail:\n{self.log_tail()}")
            time.sleep(0.05)

    def descendants(self) -> list[int]:
        """Pids of the worker's live descendant processes (its pool, keyed processes, ...)."""
        return descendants_of(self.pid) if self.alive else []

    def stop(self, timeout: float = 15.0) -> int | None:
        """Warm shutdown (SIGTERM); SIGKILL if still running after ``timeout`` seconds.

        Returns the exit code. Safe to call on a worker that already exited.
        """
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return self._proc.returncode

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the worker's main process; for SIGKILL, also reap it."""
        self._proc_or_fail().send_signal(sig)
        if sig == signal.SIGKILL:
            self._proc_or_fail().wait()

    def _proc_or_fail(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise ClusterError(f"worker {self.hostname} was never started")
        return self._proc

    def __repr__(self) -> str:
        state = "not started" if self._proc is None else f"pid={self._proc.pid} rc={self.returncode}"
        return f"<WorkerProcess {self.hostname} {state}>"


# --- a cluster -------------------------------------------------------------------------------


def short_hostname() -> str:
    """This machine's host name up to the first dot (what Celery's ``%h`` is based on)."""
    return socket.gethostname().split(".")[0]


def load_app(app_module: str, cwd: str | os.PathLike[str] | None = None) -> Celery:
    """The Celery app ``celery -A app_module`` would load, imported in this process from ``cwd``."""
    from celery.app.utils import find_app

    path = os.fspath(cwd or os.getcwd())
    if path not in sys.path:
        sys.path.insert(0, path)  # where the workers import it from; later imports of it need it too
    app: Celery = find_app(app_module)
    return app


def client_app(app: Celery, broker_url: str, result_backend: str | None = None) -> Celery:
    """A copy of ``app`` (configuration and ``Forseti`` settings) whose broker is ``broker_url``.

    The copy is not made the current app: the module-level ``forseti_celery.get_key`` and
    friends keep using the current one; call ``copy.set_current()`` to change that.
    """
    from celery import Celery

    from .app import Forseti

    conf = app.conf.table(with_defaults=False, censored=False)
    conf.pop("deprecated_settings", None)
    # Explicit read/write URLs: they win over a CELERY_BROKER_URL of the test process too.
    conf.update(broker_url=broker_url, broker_read_url=broker_url, broker_write_url=broker_url)
    if result_backend:
        conf["result_backend"] = result_backend
    copy = Celery(app.main, set_as_current=False)
    copy.conf.update(conf)
    source = getattr(app, "_forseti", None)
    if source is not None:
        Forseti(copy, **source._explicit)
    return copy


class Cluster:
    """N real Celery workers of one app on one broker.

    Workers are named ``w1-<tag>@<host>``, ``w2-<tag>@<host>``, ... unless ``hostnames`` is
    given; ``tag`` (random by default) keeps two clusters, or two test runs, sharing a broker
    from answering each other's pings and control commands as the same node. Used as a context
    manager, it starts on entry and stops on exit.

    The workers use ``broker_url`` (and ``result_backend``, if given) whatever the app names in
    its code. :attr:`app` and :attr:`forseti` are the test's side of the cluster.
    """

    def __init__(
        self,
        app_module: str,
        n: int = 3,
        *,
        broker_url: str,
        log_dir: str | os.PathLike[str] | None = None,
        pool: str = "prefork",
        concurrency: int = 1,
        hostnames: Iterable[str] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        ready_timeout: float = 60.0,
        orphan_grace: float = 5.0,
        tag: str | None = None,
        result_backend: str | None = None,
    ) -> None:
        self.app_module = app_module
        self.broker_url = broker_url
        self.result_backend = result_backend
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="forseti-cluster-"))
        self.pool = pool
        self.concurrency = concurrency
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.cwd = cwd
        self.ready_timeout = ready_timeout
        self.orphan_grace = orphan_grace
        #: Shared by all workers of this cluster: finds their orphans after shutdown.
        self.marker = uuid.uuid4().hex
        self.tag = tag or uuid.uuid4().hex[:4]
        self._next_index = 1
        names = list(hostnames) if hostnames is not None else [self._next_name() for _ in range(n)]
        self.workers: list[WorkerProcess] = [self._worker(name) for name in names]
        self._started = False

    def _next_name(self) -> str:
        name = f"w{self._next_index}-{self.tag}@{short_hostname()}"
        self._next_index += 1
        return name

    def _worker(self, hostname: str) -> WorkerProcess:
        return WorkerProcess(
            self.app_module,
            hostname,
            self.broker_url,
            self.log_dir,
            pool=self.pool,
            concurrency=self.concurrency,
            extra_args=self.extra_args,
            env=self.env,
            cwd=self.cwd,
            marker=self.marker,
            result_backend=self.result_backend,
        )

    @cached_property
    def app(self) -> Celery:
        """A copy of the workers' Celery app, imported in this process, on the cluster's broker.

        It has the app's whole configuration (its ``forseti_namespace`` too) and its
        ``Forseti`` settings, except the broker URLs (and the result backend, if the cluster has
        one), which are the cluster's. See :func:`client_app`.
        """
        return client_app(load_app(self.app_module, self.cwd), self.broker_url, self.result_backend)

    @cached_property
    def forseti(self) -> Forseti:
        """A client of the workers' namespace on the cluster's broker: ``cluster.forseti.get_key(k)``.

        Raises :class:`~forseti_celery.errors.ConfigurationError` if the app has no ``Forseti``;
        closed by :meth:`stop`.
        """
        from .app import Forseti

        return Forseti.of(self.app)

    def start(self) -> Cluster:
        """Start every worker at once, then wait until all are ready."""
        for worker in self.workers:
            worker.start()
        self._started = True
        deadline = time.monotonic() + self.ready_timeout
        for worker in self.workers:
            worker.wait_ready(max(deadline - time.monotonic(), 0.1))
        return self

    def add_worker(self, hostname: str | None = None) -> WorkerProcess:
        """Start one more worker and wait until it is ready."""
        worker = self._worker(hostname or self._next_name())
        self.workers.append(worker)
        worker.start()
        worker.wait_ready(self.ready_timeout)
        return worker

    def worker(self, hostname: str) -> WorkerProcess:
        """The worker named ``hostname``; the part before ``-<tag>`` or ``@`` is enough."""
        for worker in self.workers:
            if hostname in (worker.hostname, worker.hostname.split("@")[0], worker.hostname.split("-")[0]):
                return worker
        raise KeyError(hostname)

    @property
    def alive(self) -> list[WorkerProcess]:
        """Workers whose main process is running."""
        return [w for w in self.workers if w.alive]

    def orphans(self) -> list[int]:
        """Live processes started by this cluster's workers, other than the workers themselves."""
        mains = {w.pid for w in self.workers if w.alive}
        return [pid for pid in marked_pids(self.marker) if pid not in mains]

    def stop(self, timeout: float = 15.0, orphan_grace: float | None = None) -> list[int]:
        """Stop every worker, then kill and return the pids of processes they left behind.

        Children get ``orphan_grace`` seconds (default: the cluster's) after their worker is
        gone to exit by themselves, since a child notices its parent's death asynchronously;
        whatever still runs then is an orphan, and is SIGKILLed so nothing leaks into the next
        test.
        """
        for worker in self.workers:  # signal all first: they shut down in parallel
            if worker.alive:
                worker.kill(signal.SIGTERM)
        for worker in self.workers:
            worker.stop(timeout)
        if "forseti" in self.__dict__:
            self.forseti.close()
        grace = self.orphan_grace if orphan_grace is None else orphan_grace
        try:
            wait_for(lambda: not self.orphans(), grace, interval=0.1)
        except WaitTimeout:
            leftovers = self.orphans()
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return leftovers
        return []

    def log_tails(self, lines: int = 40) -> str:
        """Every worker's log tail, each under a header line."""
        return "\n".join(f"===== {w.hostname} ({w.log_path}) =====\n{w.log_tail(lines)}" for w in self.workers)

    def __enter__(self) -> Cluster:
        if not self._started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        orphans = self.stop()
        if orphans and exc_type is None:
            raise ClusterError(f"workers left orphan processes (now killed): {orphans}")

    def __repr__(self) -> str:
        return f"<Cluster {self.app_module} {[w.hostname for w in self.workers]}>"


# --- pytest plugin -------------------------------------------------------------------------

_CLUSTERS = pytest.StashKey[list[Cluster]]()


@pytest.fixture(scope="session")
def forseti_embedded_broker() -> Iterator[str]:
    """URL of an embedded Redis broker, started once per test session."""
    from forseti_celery.embedded import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server.url


ClusterFactory = Callable[..., Cluster]


@pytest.fixture
def forseti_cluster_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ClusterFactory]:
    """Factory ``make(app_module, n=3, pool="prefork", broker_url=None, **kw)`` of started clusters.

    ``broker_url`` defaults to ``$FORSETI_BROKER_URL``, else the session's embedded Redis; the
    workers use it even if the app names another broker in its code. ``**kw`` goes to
    :class:`Cluster`. Workers run from the rootdir, so ``app_module`` may be a dotted path such
    as ``tests.app``. ``cluster.forseti`` is the test's client: the app's namespace and
    settings, the cluster's broker. Every cluster is stopped at teardown; orphans fail the test.
    """
    clusters: list[Cluster] = []
    request.node.stash[_CLUSTERS] = clusters

    def make(
        app_module: str,
        n: int = 3,
        pool: str = "prefork",
        broker_url: str | None = None,
        **kw: Any,
    ) -> Cluster:
        url = broker_url or os.environ.get("FORSETI_BROKER_URL")
        if not url:
            url = request.getfixturevalue("forseti_embedded_broker")
        kw.setdefault("cwd", str(request.config.rootpath))
        kw.setdefault("log_dir", tmp_path / f"cluster{len(clusters) + 1}")
        cluster = Cluster(app_module, n, pool=pool, broker_url=url, **kw)
        clusters.append(cluster)
        return cluster.start()

    yield make

    leftovers = {repr(c): orphans for c in clusters if (orphans := c.stop())}
    if leftovers:
        pytest.fail(f"workers left orphan processes (now killed): {leftovers}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Add the workers' log tails to the report of a failed test (or failed teardown)."""
    report = yield
    clusters = item.stash.get(_CLUSTERS, None)
    if report.failed and clusters:
        for cluster in clusters:
            report.sections.append((f"forseti worker logs: {cluster!r}", cluster.log_tails()))
    return report
