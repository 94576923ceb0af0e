"""What runs inside a keyed process: its main loop, its mailbox and the pipe protocol to its worker.
Never imports the worker or the client side.
"""

from . import aio as aio  # wires async keyed processes into the runtime (runtime.serve_async)
