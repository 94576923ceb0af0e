"""What a client's first connection would import on the way, imported with the client instead.

kombu resolves a connection's transport (and so imports it) when the first connection is made,
and the client libraries import more on their first connection: a client that connects from a
process that imported it earlier (a pre-fork web server's workers, a worker's tasks, a long
script) would pay some 6-7 ms of imports inside its first request (issue 15, measured in
docs/benchmarks.rst "The first request of a new client process"). Imported here, those are paid
once by ``import forseti_celery``, in the parent of a fork: for a short-lived process the total
is the same, only no longer inside the first request.
"""

from __future__ import annotations

# Each is imported for its side effect on sys.modules (what imports it lazily, and when):
import email.parser  # noqa: F401 - redis-py's Connection() looks up its version (importlib.metadata)
import encodings.idna  # noqa: F401 - socket.getaddrinfo encodes a host name given as str with it
import importlib.metadata  # noqa: F401 - as email.parser
import secrets  # noqa: F401 - redis-py's ConnectionPool() names itself with it

import kombu.transport.pyamqp
import kombu.transport.redis  # noqa: F401 - the two transports forseti runs on (kombu: at connect)

__all__: list[str] = []
