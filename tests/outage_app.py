"""``tests.app`` with a small restart budget, for workers whose broker the test cuts off."""

from __future__ import annotations

import os

from tests.app import app, forseti

app.conf.update(
    forseti_max_retries=int(os.environ.get("FORSETI_MAX_RETRIES", "2")),
    forseti_max_time=float(os.environ.get("FORSETI_MAX_TIME", "30")),
)

__all__ = ["app", "forseti"]
