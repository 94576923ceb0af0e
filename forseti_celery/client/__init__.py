"""What a process that asks for keys runs: requests to the leader and to keyed processes, and the
cache of live refs. Never imports the worker or the child side.
"""

from . import preload as _preload  # noqa: F401 - what the first connection would import (see there)
