"""A fresh client process (``python -m benchmarks.run --probe KIND ...``): its first request,
connecting, and its second, timed from inside and printed as JSON."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from benchmarks.common import ROOT, timed


def probe(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``python -m benchmarks.run --probe ...`` and return the JSON it prints."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--probe", *argv], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"probe failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return dict(json.loads(lines[-1]))


def probe_main(argv: list[str]) -> None:
    """In a fresh process: the first lookup (connecting) and the second (connected), in ms."""
    kind, first, second = argv[0], argv[1], argv[2]
    if kind == "forseti":
        from benchmarks.app import app
        from forseti_celery import Forseti

        forseti = Forseti.of(app)
        t1 = timed(lambda: forseti.get_key(first))
        t2 = timed(lambda: forseti.get_key(second))
        t3 = timed(forseti.client.close)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        ray.init(address=argv[3], namespace=argv[4], log_to_driver=False, logging_level=logging.ERROR)
        t1 = timed(lambda: ray.get_actor(first))
        t2 = timed(lambda: ray.get_actor(second))
        ray.shutdown()
    print(json.dumps({"first_ms": t1 * 1000, "second_ms": t2 * 1000,
                      **({"close_ms": t3 * 1000} if kind == "forseti" else {})}), flush=True)

