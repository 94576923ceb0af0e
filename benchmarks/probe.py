"""A fresh client process (``python -m benchmarks.run --probe KIND ...``): its first request,
connecting, and its second, timed from inside and printed as JSON.

What row 3a compares is everything a new process does after its imports until its first answer:
for forseti the first ``get_key`` (it builds the client, connects and makes the request), for Ray
``ray.init(address=...)`` (it connects) plus the first ``ray.get_actor`` (both parts are also
printed). Imports are left out on each side (forseti_celery and the app are imported before
the clock starts; ``import ray`` is timed apart, ``import_ms``), as the floor's first request
leaves out ``import redis``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

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
        out = {"first_ms": timed(lambda: forseti.get_key(first)),
               "second_ms": timed(lambda: forseti.get_key(second)), "close_ms": timed(forseti.client.close)}
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        t0 = time.perf_counter()
        import ray

        imported = time.perf_counter() - t0
        init = timed(lambda: ray.init(address=argv[3], namespace=argv[4], log_to_driver=False,
                                      logging_level=logging.ERROR))
        get_actor = timed(lambda: ray.get_actor(first))
        # first_ms: connecting included, as forseti's first request connects.
        out = {"import_ms": imported, "init_ms": init, "get_actor_ms": get_actor, "first_ms": init + get_actor,
               "second_ms": timed(lambda: ray.get_actor(second))}
        ray.shutdown()
    print(json.dumps({name: seconds * 1000 for name, seconds in out.items()}), flush=True)

