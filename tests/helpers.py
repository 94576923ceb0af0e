"""Test helpers: a real cluster of ``tests.app`` workers plus a client app on the same namespace."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery import Celery

from forseti_celery import Forseti, KeyRef, MailboxFull
from forseti_celery.testing import Cluster, short_hostname, wait_for

ROOT = Path(__file__).resolve().parent.parent


class Harness:
    """Workers of ``app`` (``tests.app`` unless given; a namespace of their own) and a client app talking to them."""

    def __init__(self, broker_url: str, tmp: Path, n: int = 3, pool: str = "prefork", app: str = "tests.app",
                 **env: str) -> None:
        self.namespace = f"forseti-t{uuid.uuid4().hex[:8]}"
        self.journal_dir = tmp / "journal"
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        self.env = {"FORSETI_NAMESPACE": self.namespace, "FORSETI_JOURNAL": str(self.journal_dir), **env}
        # Hostnames of their own: Celery's pidbox queues are per hostname on the whole broker.
        tag = self.namespace.rsplit("-", 1)[-1][1:5]
        self.cluster = Cluster(app, n, broker_url=broker_url, pool=pool, log_dir=tmp / "logs",
                               env=self.env, cwd=str(ROOT), hostnames=[f"w{i}-{tag}@{short_hostname()}"
                                                                      for i in range(1, n + 1)])
        self.app = client_app(broker_url, self.namespace)
        self.forseti = Forseti.of(self.app)

    def start(self) -> Harness:
        self.cluster.start()
        self.wait_members(len(self.cluster.workers))
        return self

    def wait_members(self, n: int, timeout: float = 30.0) -> dict[str, int]:
        """Wait until the leader serves and lists ``n`` eligible workers."""
        def ready() -> dict[str, int] | None:
            try:
                metrics = self.forseti.get_metrics(timeout=2)
            except Exception:
                return None
            return metrics if len(metrics) == n else None
        return wait_for(ready, timeout, 0.1, lambda: f"cluster never listed {n} workers\n{self.cluster.log_tails()}")

    def journal(self) -> list[dict[str, Any]]:
        """Every start/end the keyed processes recorded themselves."""
        entries = []
        for path in self.journal_dir.glob("*.jsonl"):
            entries.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
        return sorted(entries, key=lambda e: e["t"])

    def starts(self, key: str) -> list[dict[str, Any]]:
        return [e for e in self.journal() if e["ev"] == "start" and e["key"] == key]

    def stop(self) -> list[int]:
        self.forseti.close()
        return self.cluster.stop()


def client_app(broker_url: str, namespace: str) -> Celery:
    """A Celery app for the test process, on the cluster's namespace."""
    app = Celery(f"client-{namespace}", broker=broker_url, backend="rpc://", set_as_current=False)
    app.conf.update(forseti_namespace=namespace, forseti_heartbeat=0.5, forseti_node_timeout=3,
                    task_default_queue=namespace,
                    broker_connection_retry_on_startup=True)
    Forseti(app)
    return app


@contextmanager
def harness(broker_url: str, tmp: Path, **kw: Any) -> Iterator[Harness]:
    h = Harness(broker_url, tmp, **kw)
    try:
        yield h.start()
    finally:
        orphans = h.stop()
        assert not orphans, f"orphan processes left: {orphans}"


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def fresh(prefix: str) -> str:
    """A key no earlier test used."""
    return f"{prefix}-{time.monotonic_ns()}"


def seen_once_continued(ref: KeyRef, timeout: float = 20.0) -> list[Any]:
    """What a ``recorder`` keyed process, stopped and sent past its mailbox then continued, says it
    has taken (``call("seen")``), asked until its mailbox has room for the call."""
    def seen() -> list[Any] | None:
        try:
            return ref.call("seen", timeout=5)  # type: ignore[no-any-return]
        except MailboxFull:  # still taking what waited for it
            return None
    return wait_for(seen, timeout, 0.1, "the continued process never answered")


@contextmanager
def events(h: Harness) -> Iterator[list[dict[str, Any]]]:
    """Every worker event of ``h``'s broker received while inside, in order, as Celery's event
    receiver gives them (forseti's start, exit, restart and given-up events among them)."""
    received: list[dict[str, Any]] = []
    with h.app.connection_for_read() as conn:
        recv = h.app.events.Receiver(conn, handlers={"*": received.append})
        thread = threading.Thread(target=recv.capture, kwargs={"wakeup": False}, daemon=True)
        thread.start()
        wait_for(lambda: received, 10, message="no event at all reached the receiver")
        try:
            yield received
        finally:
            recv.should_stop = True
            thread.join(5)


def pool_with_answers(hostname: str, target: Any, config: Any) -> tuple[Any, queue.SimpleQueue[dict[str, Any]]]:
    """A worker's pool of keyed processes in this process, running ``target`` for every name
    (not started yet), and the queue its answers to callers go to (what it sends the leader is dropped)."""
    from forseti_celery.worker.pool.children import Children

    answers: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()

    def publish(batches: list[tuple[str, list[dict[str, Any]]]]) -> None:
        for routing_key, msgs in batches:
            if routing_key == "reply":
                for m in msgs:
                    answers.put(m)

    return Children(hostname, lambda name: target, publish, "leader", lambda *a, **kw: None, config), answers
