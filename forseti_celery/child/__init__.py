"""What runs inside a keyed process: its main loop, its mailbox and the pipe protocol to its worker.
Never imports the worker or the client side.
"""

from . import aio as aio  # wires async keyed processes into the runtime (runtime.serve_async)
from . import rehearsal as _rehearsal

_rehearsal.rehearse()  # in the worker, before it forks: every keyed process shares the code it warms
