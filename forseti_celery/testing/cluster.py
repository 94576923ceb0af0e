"""A cluster of real Celery workers of one app, and the test's client of it.

:class:`Cluster` starts N :class:`~forseti_celery.testing.WorkerProcess` es on one broker
(whatever broker the app names in its code) and, on :meth:`Cluster.stop`, finds every process
any of them left behind. :attr:`Cluster.app` is a copy of the workers' app on that broker
(:func:`client_app`), :attr:`Cluster.forseti` the ``Forseti`` on it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from .processes import ClusterError, WaitTimeout, WorkerProcess, marked_pids, wait_for

if TYPE_CHECKING:
    from celery import Celery

    from ..app import Forseti

__all__ = ["Cluster", "client_app", "load_app", "short_hostname"]


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

    from ..app import Forseti

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

        Raises :class:`~forseti_celery.core.errors.ConfigurationError` if the app has no ``Forseti``;
        closed by :meth:`stop`.
        """
        from ..app import Forseti

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
