"""A throwaway Celery app for the harness's own tests (imports nothing from forseti_celery)."""

from __future__ import annotations

import os
import subprocess

from celery import Celery

app = Celery("harness_app", broker=os.environ.get("FORSETI_BROKER_URL", "memory://"))
app.conf.broker_connection_retry_on_startup = True


@app.task(name="harness.add")
def add(x: int, y: int) -> int:
    """Add two numbers."""
    return x + y


@app.task(name="harness.spawn_sleeper")
def spawn_sleeper(seconds: int = 300) -> int:
    """Start a ``sleep`` that outlives the worker (an orphan for the harness to find)."""
    return subprocess.Popen(["sleep", str(seconds)], start_new_session=True).pid
