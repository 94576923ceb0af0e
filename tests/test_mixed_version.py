"""A rolling upgrade: workers of the last commit before the layers (53b7ab4) and of this tree in one
namespace, on Redis and on RabbitMQ.

The old code is built from git (``git archive``) into a temporary folder and run by this venv's
python with that folder first on its path; both versions run ``tests.mixed_app``. A client of this
tree places keys on both, calls, sends to and stops them, and each version in turn leads: the
leader is warm-stopped (as a rolling upgrade does), and the worker of the other version that takes
over rebuilds its table from the REPORT of a worker of the first version, whose keys keep their
process (same node, pid and state). On Redis the successor is steered by stopping (SIGSTOP) the
other candidate until the lease is taken; on RabbitMQ the single active consumer passes to the
oldest remaining consumer, which is the one started first.

Workers from before issue 10's framing (c1e40a0: ``<envelope JSON>\\t<payload JSON>`` lines) cannot
share a namespace with these: see "Rolling upgrades" in docs/design.rst (Messages).
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from forseti_celery import Forseti, KeyRef
from forseti_celery.testing import WorkerProcess, marked_pids, short_hostname, wait_for

from .helpers import ROOT, client_app

#: The last commit before the package moved into layers: the code a cluster is upgraded from.
OLD_COMMIT = "53b7ab4"


def old_tree(dest: Path) -> Path:
    """The package at :data:`OLD_COMMIT`, extracted into ``dest`` (skips when git lacks it)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{OLD_COMMIT}^{{commit}}"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        archive = subprocess.run(["git", "archive", sha, "forseti_celery"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"commit {OLD_COMMIT} is not in this clone (shallow, or no git): no old code to run")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    assert (dest / "forseti_celery" / "children.py").exists(), "the old code is the flat package"
    return dest


class Mixed:
    """Workers of either version in one namespace, started one at a time, and a client of this tree."""

    def __init__(self, broker_url: str, tmp: Path, old: Path) -> None:
        self.broker_url = broker_url
        self.tmp = tmp
        self.old = old
        self.namespace = f"forseti-mix{uuid.uuid4().hex[:8]}"
        self.tag = self.namespace[-4:]
        self.marker = uuid.uuid4().hex
        # A stopped (SIGSTOP) candidate must not fence itself or be declared dead while steered.
        self.env = {"FORSETI_NAMESPACE": self.namespace, "FORSETI_NODE_TIMEOUT": "10"}
        self.workers: dict[str, WorkerProcess] = {}
        self.app = client_app(broker_url, self.namespace)
        self.forseti = Forseti.of(self.app)

    def start(self, name: str, version: str) -> WorkerProcess:
        """Start worker ``<name>-<tag>`` of ``version`` ("old" or "new"); wait until it is ready."""
        env = dict(self.env)
        if version == "old":
            # Run from the old tree: python -m puts the cwd first, ahead of PYTHONPATH.
            env["PYTHONPATH"] = os.pathsep.join([str(self.old), str(ROOT)])
            cwd = self.old
        else:
            env["PYTHONPATH"] = str(ROOT)
            cwd = ROOT
        worker = WorkerProcess("tests.mixed_app", f"{name}-{self.tag}@{short_hostname()}", self.broker_url,
                               self.tmp / "logs", env=env, cwd=cwd, marker=self.marker)
        self.workers[name] = worker.start()
        worker.wait_ready()
        origin = self.old if version == "old" else ROOT
        assert f"forseti_celery from {origin / 'forseti_celery'}" in worker.log_text(), worker.log_tail()
        return worker

    def host(self, name: str) -> str:
        return self.workers[name].hostname

    def logs(self) -> str:
        return "\n".join(f"===== {w.hostname} =====\n{w.log_tail(30)}" for w in self.workers.values())

    def wait_members(self, *names: str, timeout: float = 30.0) -> None:
        """Wait until the leader serves and lists exactly these workers."""
        want = {self.host(n) for n in names}

        def listed() -> bool:
            try:
                return set(self.forseti.get_metrics(timeout=2)) == want
            except Exception:
                return False
        wait_for(listed, timeout, 0.1, lambda: f"the leader never listed {sorted(want)}\n{self.logs()}")

    def leader(self) -> str | None:
        """Hostname of the worker whose ``inspect stats`` says it leads, if exactly one does."""
        alive = [w.hostname for w in self.workers.values() if w.alive]
        stats = self.app.control.inspect(destination=alive, timeout=3, limit=len(alive)).stats() or {}
        leaders = [host for host, s in stats.items() if s.get("forseti", {}).get("leader")]
        return leaders[0] if len(leaders) == 1 else None

    def wait_leader(self, name: str, timeout: float = 30.0) -> None:
        host = self.host(name)
        wait_for(lambda: self.leader() == host, timeout, 0.2, lambda: f"{host} never led\n{self.logs()}")

    def key_on(self, name: str, prefix: str) -> KeyRef:
        """A new key that the leader placed on worker ``name`` (the least used: placement decides)."""
        host = self.host(name)
        for i in range(6):
            ref = self.forseti.get_key(f"{prefix}-{uuid.uuid4().hex[:6]}-{i}", timeout=20)
            if ref.node == host:
                return ref
        raise AssertionError(f"six new keys and none placed on {host}\n{self.logs()}")

    def stop_leader(self, leader: str, successor: str, other: str) -> None:
        """Warm-stop ``leader``; ``successor`` takes over while ``other`` (of the other version) is a member."""
        steer = self.broker_url.startswith("redis")
        if steer:  # the lease goes to whoever polls first: keep ``other`` from polling
            self.workers[other].kill(signal.SIGSTOP)
        try:
            self.workers[leader].kill(signal.SIGTERM)
            if steer:
                holder = f"{self.namespace}:leader:holder"
                with redis.Redis.from_url(self.broker_url) as r:
                    wait_for(lambda: (r.get(holder) or b"").decode().endswith(" " + self.host(successor)), 15,
                             0.05, lambda: f"{successor} never took the lease\n{self.logs()}")
        finally:
            if steer:
                self.workers[other].kill(signal.SIGCONT)
        assert self.workers[leader].stop() == 0, self.workers[leader].log_tail()
        self.wait_leader(successor)

    def close(self) -> list[int]:
        self.forseti.close()
        for worker in self.workers.values():
            if worker.alive:
                worker.kill(signal.SIGTERM)
        for worker in self.workers.values():
            worker.stop()
        leftovers: list[int] = []
        try:
            wait_for(lambda: not marked_pids(self.marker), 5, 0.1)
        except AssertionError:
            leftovers = marked_pids(self.marker)
            for pid in leftovers:
                os.kill(pid, signal.SIGKILL)
        return leftovers


@pytest.fixture(scope="module")
def old_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return old_tree(tmp_path_factory.mktemp("old"))


@pytest.fixture
def mixed(broker_url: str, tmp_path: Path, old_code: Path) -> Iterator[Mixed]:
    m = Mixed(broker_url, tmp_path, old_code)
    try:
        yield m
    finally:
        assert not m.close(), "workers left orphan processes"


def used(ref: KeyRef, client: Forseti) -> int:
    """Send "inc" to ``ref`` and return its value, asked with a call (in order after the send)."""
    client.get_key(ref.key).send("inc")
    return int(client.get_key(ref.key).call("get", timeout=10))


def serves(m: Mixed, name: str, prefix: str) -> None:
    """The leader places a new key on worker ``name``, which answers calls and sends; a stop frees the
    key once the worker's exit report reaches the leader."""
    ref = m.key_on(name, prefix)
    assert ref.call("pid", timeout=10) == ref.pid
    assert ref.call({"x": [1, "é"]}, timeout=10) == ["echo", {"x": [1, "é"]}]
    assert used(ref, m.forseti) == 1
    ref.stop(timeout=10)
    assert m.forseti.search_key(ref.key, timeout=10) is None
    assert m.forseti.get_key(ref.key, timeout=20).pid != ref.pid


def same_process(m: Mixed, ref: KeyRef, value: int) -> None:
    """``ref``'s key still has its process (node and pid), with its state."""
    again = m.forseti.get_key(ref.key, timeout=20)
    assert (again.node, again.pid) == (ref.node, ref.pid), f"{ref.key} moved: {again} was {ref}\n{m.logs()}"
    assert again.call("get", timeout=10) == value


def test_old_and_new_workers_share_a_namespace_through_two_leader_changes(mixed: Mixed) -> None:
    m = mixed
    # The old worker leads, the new one joins: new keys land on both, and both serve them.
    m.start("o1", "old")
    m.wait_leader("o1")
    m.start("n1", "new")
    m.wait_members("o1", "n1")
    serves(m, "o1", "first-o1")
    serves(m, "n1", "first-n1")
    on_o1, on_n1 = m.key_on("o1", "o1"), m.key_on("n1", "n1")
    assert used(on_o1, m.forseti) == used(on_n1, m.forseti) == 1

    # Old leader stopped: the new worker takes over and rebuilds from an old worker's REPORT.
    m.start("o2", "old")
    m.wait_members("o1", "n1", "o2")
    on_o2 = m.key_on("o2", "o2")
    assert used(on_o2, m.forseti) == 1
    m.stop_leader("o1", successor="n1", other="o2")
    m.wait_members("n1", "o2")
    same_process(m, on_n1, 1)
    same_process(m, on_o2, 1)
    assert m.forseti.search_key(on_o1.key, timeout=10) is None  # it went with its worker
    assert used(on_o2, m.forseti) == 2
    serves(m, "o2", "second-o2")
    serves(m, "n1", "second-n1")

    # New leader stopped: the old worker takes over and rebuilds from a new worker's REPORT.
    m.start("n2", "new")
    m.wait_members("n1", "o2", "n2")
    on_n2 = m.key_on("n2", "n2")
    assert used(on_n2, m.forseti) == 1
    m.stop_leader("n1", successor="o2", other="n2")
    m.wait_members("o2", "n2")
    same_process(m, on_o2, 2)
    same_process(m, on_n2, 1)
    serves(m, "n2", "third-n2")
    serves(m, "o2", "third-o2")
