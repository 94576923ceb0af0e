"""The layers of issue 11 hold: import-linter's contracts pass and catch a forbidden import, and a
client process (``import forseti_celery``, a ``get_key`` and a ``call`` against a real worker) loads
no worker- or child-side module."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT, fresh, harness

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
#: Modules a client process must never load: they run in a worker or in a keyed process.
SERVER_SIDE = re.compile(r"^forseti_celery\.(worker|child)(\.|$)")


def lint_imports(cwd: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with the project's contracts, on the ``forseti_celery`` found in ``cwd``."""
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the dev extra (pip install -e '.[dev]')")
    args = [str(LINT_IMPORTS), "--no-cache", "--no-logo", *(f"--contract={c}" for c in contracts),
            str(ROOT / "pyproject.toml")]
    return subprocess.run(args, cwd=cwd, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)},
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_import_contracts_pass_with_no_cycle() -> None:
    every = lint_imports(ROOT)
    assert every.returncode == 0, every.stdout + every.stderr
    ours = lint_imports(ROOT, "layers", "client-alone", "no-cycles")
    assert "Contracts: 3 kept, 0 broken." in ours.stdout, ours.stdout


def test_make_lint_runs_lint_imports_installed_by_the_dev_extra() -> None:
    lint = re.search(r"^lint:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert lint is not None and "$(BIN)/lint-imports" in lint.group(1)
    dev = re.search(r"^dev = \[\n(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert dev is not None and re.search(r'^\s*"import-linter\b', dev.group(1), re.M), "no import-linter in dev"


@pytest.mark.parametrize(
    ("module", "source", "contract"),
    [
        ("client/_bad.py", "import forseti_celery.worker\n", "client-alone"),
        ("client/_bad.py", "import forseti_celery.child\n", "client-alone"),
        ("core/_bad.py", "import forseti_celery.client\n", "layers"),
        ("child/_bad.py", "import forseti_celery.worker\n", "layers"),
        ("worker/_bad.py", "import forseti_celery.app\n", "layers"),
        ("core/_bad.py", "from . import _bad2\n", "no-cycles"),
    ],
    ids=["client-worker", "client-child", "core-client", "child-worker", "worker-facade", "cycle"],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, module: str, source: str, contract: str) -> None:
    shutil.copytree(ROOT / "forseti_celery", tmp_path / "forseti_celery",
                    ignore=shutil.ignore_patterns("__pycache__"))
    clean = lint_imports(tmp_path, contract)
    assert clean.returncode == 0, f"the copy breaks {contract} before any change:\n{clean.stdout}"
    (tmp_path / "forseti_celery" / module).write_text(source)
    if contract == "no-cycles":  # _bad imports _bad2, which imports _bad
        (tmp_path / "forseti_celery" / "core" / "_bad2.py").write_text("from . import _bad\n")
    result = lint_imports(tmp_path, contract)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout and "0 kept, 1 broken" in result.stdout, result.stdout


def test_import_forseti_celery_loads_no_worker_or_child_module() -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import forseti_celery"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=True)
    loaded = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "forseti_celery" in loaded and "forseti_celery.app" in loaded, result.stderr
    assert [m for m in loaded if SERVER_SIDE.match(m)] == []


#: A web client's whole use of forseti: prints the answer and the forseti modules it loaded.
CLIENT = """
import json, sys
from celery import Celery
import forseti_celery

url, namespace, key = sys.argv[1:]
app = Celery("client", broker=url, set_as_current=False)
app.conf.update(forseti_namespace=namespace, broker_connection_retry_on_startup=True)
forseti = forseti_celery.Forseti(app)
ref = forseti_celery.get_key(key, app=app, timeout=20)
answer = ref.call("key", timeout=10)
forseti.close()
print(json.dumps({"answer": answer, "modules": sorted(m for m in sys.modules if m.startswith("forseti_celery"))}))
"""


def test_a_client_process_get_key_and_call_load_no_worker_or_child_module(broker_url: str, tmp_path: Path) -> None:
    with harness(broker_url, tmp_path, n=1) as h:
        key = fresh("layers")
        result = subprocess.run([sys.executable, "-c", CLIENT, broker_url, h.namespace, key], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout.splitlines()[-1])
        assert out["answer"] == key
        assert "forseti_celery.client.client" in out["modules"], out["modules"]
        assert [m for m in out["modules"] if SERVER_SIDE.match(m)] == []
