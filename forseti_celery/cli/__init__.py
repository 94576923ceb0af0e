"""``celery forseti``: the cluster's keyed processes from the shell.

A Celery CLI plugin (entry point ``celery.commands``), so it runs with the app
given to ``celery -A``::

    celery -A proj forseti status                  # leader, processes per worker, totals
    celery -A proj forseti keys [--node N] [--name NAME]
    celery -A proj forseti get KEY [--name NAME] [--args '[1, "x"]']   # started if absent
    celery -A proj forseti search KEY [--name NAME]                  # never starts one
    celery -A proj forseti call KEY MSG [--name NAME]                # MSG and the answer in JSON
    celery -A proj forseti send KEY MSG [--name NAME]
    celery -A proj forseti stop KEY [--name NAME]
    celery -A proj forseti rebalance [--timeout S]                   # movable keys, evenly

Every subcommand takes ``--json`` and ``--timeout``. Exit codes, for scripts:
0 ok; 1 not found (no such key, unknown name); 2 usage; 3 no answer in time
(no leader, no worker, broker unreachable); 4 any other :class:`ForsetiError`.
Every error is one ``Error: TEXT`` line on stderr (and ``{"error": KIND,
"message": TEXT}`` on stdout with ``--json``); a dead broker fails every
subcommand after one short retry.
"""

from __future__ import annotations

from typing import Any

import click

from .cluster import keys, status
from .key import call, get, search, send, stop
from .rebalance import rebalance
from .support import EXIT_ERROR, EXIT_NOT_FOUND, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE

__all__ = ["EXIT_ERROR", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_UNAVAILABLE", "EXIT_USAGE", "forseti"]


@click.group(name="forseti")
def forseti(**kwargs: Any) -> None:
    """Keyed processes of forseti_celery: status, keys, get, search, call, send, stop, rebalance.

    Exit codes: 0 ok, 1 not found, 2 usage, 3 no answer in time (no leader, no
    worker, broker unreachable), 4 other forseti error.
    """


# Click lists a group's commands sorted by name, whatever the order they are added in.
for _command in (status, keys, get, search, call, send, stop, rebalance):
    forseti.add_command(_command)
