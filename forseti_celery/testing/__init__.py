"""Real ``celery worker`` processes for tests, and the pytest plugin around them.

:class:`Cluster` starts N :class:`WorkerProcess` es (each a ``python -m celery worker``
subprocess logging to its own file) on one broker, hands the test a client of theirs
(:attr:`Cluster.forseti`) and, on :meth:`Cluster.stop`, finds every process any of them left
behind.

The pytest plugin (registered through the ``pytest11`` entry point) adds two fixtures:

* ``forseti_embedded_broker`` (session): the URL of an embedded Redis started once per session.
* ``forseti_cluster_factory``: ``make(app_module, n=3, pool="prefork", broker_url=None, **kw)``
  returns a started :class:`Cluster`, whose workers use the cluster's broker whatever the app
  names in its code, and whose :attr:`Cluster.forseti` is a client of the app's namespace on
  that broker; every cluster is stopped at teardown, and the test errors if a cluster left
  orphans. When a test fails, the workers' log tails are added to its report.

pytest-celery's ``celery_setup`` on these workers is an opt-in plugin of its own:
:mod:`forseti_celery.testing.celery_setup`.

This package is imported by pytest for every run: keep its imports light.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .cluster import Cluster, client_app, load_app, short_hostname
from .processes import MARKER_ENV, ClusterError, WaitTimeout, WorkerProcess, descendants_of, marked_pids, wait_for

__all__ = [
    "MARKER_ENV",
    "Cluster",
    "ClusterError",
    "WaitTimeout",
    "WorkerProcess",
    "client_app",
    "descendants_of",
    "load_app",
    "marked_pids",
    "short_hostname",
    "wait_for",
]

# --- pytest plugin -------------------------------------------------------------------------

_CLUSTERS = pytest.StashKey[list[Cluster]]()


@pytest.fixture(scope="session")
def forseti_embedded_broker() -> Iterator[str]:
    """URL of an embedded Redis broker, started once per test session."""
    from forseti_celery.embedded import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server.url


def _default_broker_url(request: pytest.FixtureRequest) -> str:
    """``$FORSETI_BROKER_URL``, else the URL of the session's embedded Redis (started on first use)."""
    return os.environ.get("FORSETI_BROKER_URL") or str(request.getfixturevalue("forseti_embedded_broker"))


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
        url = broker_url or _default_broker_url(request)
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
