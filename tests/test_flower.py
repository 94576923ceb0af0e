"""Flower 2 against two real workers: it shows the forseti stats section and counts forseti events.

Flower runs with ``--enable_events=False``: it must not switch task events on in every worker
of the shared broker, and forseti's events must reach it from workers running without ``-E``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from forseti_celery.testing import wait_for

from .helpers import ROOT, Harness, harness

pytest.importorskip("flower")


@dataclass
class Flower:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str) -> Any:
        """GET ``path`` and decode its JSON (``None`` while Flower cannot answer)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                body = response.read()
        except (OSError, urllib.error.URLError):
            return None
        return json.loads(body) if body.lstrip()[:1] in (b"{", b"[") else body.decode()

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


Running = tuple[Harness, Flower]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    url = request.getfixturevalue(f"{request.param}_url")
    tmp = tmp_path_factory.mktemp(f"flower-{request.param}")
    with harness(url, tmp, n=2) as h:
        port = free_port()
        env = {**os.environ, "FORSETI_BROKER_URL": url, "FORSETI_NAMESPACE": h.namespace,
               "FLOWER_UNAUTHENTICATED_API": "true"}
        log = tmp / "flower.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tests.app", "flower", f"--port={port}",
                 "--address=127.0.0.1", "--enable_events=False", "--inspect_timeout=3000"],
                env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        flower = Flower(f"http://127.0.0.1:{port}", proc, log)
        try:
            wait_for(lambda: proc.poll() is not None or flower.get("/healthcheck") == "OK", 60, 0.2,
                     lambda: f"Flower never answered\n{flower.tail()}")
            assert proc.poll() is None, f"Flower exited\n{flower.tail()}"
            yield h, flower
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def hostnames(h: Harness) -> list[str]:
    return [w.hostname for w in h.cluster.workers]


def event_counts(flower: Flower, hosts: list[str]) -> dict[str, dict[str, Any]]:
    """What Flower's dashboard data (``/workers?json=1``) counts for ``hosts``, by event type."""
    data = flower.get("/workers?json=1") or {"data": []}
    return {w["hostname"]: w for w in data["data"] if w["hostname"] in hosts}


def test_flower_shows_the_forseti_stats_section_of_every_worker(cluster: Running) -> None:
    h, flower = cluster
    ref = h.forseti.get_key(f"flower-stats-{time.monotonic_ns()}")

    def sections() -> dict[str, Any] | None:
        workers = flower.get("/api/workers?refresh=1") or {}
        found = {host: workers.get(host, {}).get("stats", {}).get("forseti") for host in hostnames(h)}
        return found if all(found.values()) and found[ref.node]["total"] == 1 else None

    found = wait_for(sections, 30, 0.5, lambda: f"no forseti section in /api/workers\n{flower.tail()}")
    assert sorted(s["leader"] for s in found.values()) == [False, True]
    assert found[ref.node]["processes"] == {"default": 1}
    page = urllib.request.urlopen(f"{flower.url}/worker/{quote(ref.node)}", timeout=10).read().decode()
    assert "forseti" in page and "Other statistics" in page  # the worker page's "Other" tab
    ref.stop()


def test_flower_counts_forseti_events_per_worker(cluster: Running) -> None:
    h, flower = cluster
    hosts = hostnames(h)
    # Events are transient: start once Flower hears these workers (their heartbeats).
    wait_for(lambda: len(event_counts(flower, hosts)) == 2, 30, 0.5,
             lambda: f"Flower never heard {hosts}\n{flower.tail()}")
    before = event_counts(flower, hosts)
    refs = [h.forseti.get_key(f"flower-events-{i}-{time.monotonic_ns()}") for i in range(3)]
    for r in refs:
        r.stop()
    expected = {host: sum(r.node == host for r in refs) for host in hosts}

    def counted(kind: str, host: str) -> int:
        return int(event_counts(flower, hosts)[host].get(kind, 0)) - int(before[host].get(kind, 0))

    def all_counted() -> bool:
        return all(counted(kind, host) == n for host, n in expected.items()
                   for kind in ("forseti-process-started", "forseti-process-exited"))

    wait_for(all_counted, 15, 0.3, lambda: f"Flower counted {event_counts(flower, hosts)}, expected {expected}")
