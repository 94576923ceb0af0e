"""Flower 2 against two real workers: it shows the forseti stats section and counts forseti events.

Flower runs with ``--enable_events=False``: it must not switch task events on in every worker
of the shared broker, and forseti's events must reach it from workers running without ``-E``.
"""

from __future__ import annotations

import html
import json
import os
import re
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

from .helpers import ROOT, Harness, fresh, harness

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


def other_tab(flower: Flower, host: str) -> dict[str, str]:
    """The rows of the "Other" tab of ``host``'s worker page, as a person reads them (name: text)."""
    page = urllib.request.urlopen(f"{flower.url}/worker/{quote(host)}", timeout=10).read().decode()
    tab = page[page.index('id="tab-other"'):]
    tab = tab[:tab.index("</table>")]
    cells = [html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", tab, re.S)]
    return dict(zip(cells[::2], cells[1::2], strict=True))


def test_flowers_other_tab_shows_forseti_as_rows_of_plain_words(cluster: Running) -> None:
    h, flower = cluster
    refs = [h.forseti.get_key(fresh("flower-rows")), h.forseti.get_key(fresh("flower-rows"), name="poller")]
    here = {host: [r for r in refs if r.node == host] for host in hostnames(h)}

    def rows() -> dict[str, dict[str, str]] | None:
        flower.get("/api/workers?refresh=1")  # the page shows the stats Flower last asked for
        found = {host: other_tab(flower, host) for host in here}
        counted = all(found[host].get("forseti keys", "").startswith(f"{len(mine)}") for host, mine in here.items())
        table = any(row.get("forseti role", "").endswith(" 2 keys in the cluster") for row in found.values())
        return found if counted and table else None

    found = wait_for(rows, 30, 0.5, lambda: f"no forseti rows in the Other tab\n{flower.tail()}")
    leader = next(host for host, row in found.items() if row["forseti role"].startswith("leader"))
    for host, row in found.items():
        mine = here[host]
        by_name = ", ".join(f"{n} {sum(r.name == n for r in mine)}" for n in sorted({r.name for r in mine}))
        assert row["forseti namespace"] == h.namespace
        assert row["forseti keys"] == (f"{len(mine)}: {by_name}" if mine else "0")
        assert row["forseti new keys"] == "placed here"
        assert row["forseti members"] == f"2: {', '.join(sorted(here))}"
        assert re.fullmatch(r"\d+ started, \d+ exited", row["forseti starts"]), row
        epoch = found[leader]["forseti role"].split("epoch ")[1].split(")")[0]
        assert row["forseti role"] == (
            f"leader (epoch {epoch}), 2 keys in the cluster" if host == leader else f"member (leader epoch {epoch})")
        assert "{" not in "".join(v for k, v in row.items() if k != "forseti")  # no raw Python dicts but one
    # The same worker, to a program: the machine-readable section, unchanged, next to the rows.
    workers = flower.get("/api/workers") or {}
    assert workers[leader]["stats"]["forseti"]["leader"] is True
    assert workers[leader]["stats"]["forseti role"] == found[leader]["forseti role"]
    for r in refs:
        r.stop()


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
