"""The worker's rehearsal of a sync keyed process's life, before it forks any: memory, not speed.

CPython 3.11 rewrites a function's bytecode in place once it has run a few times (its adaptive
specialisation, after 8 calls or loop turns), and caches what modules build on first use. In a
keyed process forked from a worker that never ran this code, the first messages copy every page
that holds it: about 0.5 MB per keyed process here. :func:`rehearse` runs it in the worker (at
import of :mod:`forseti_celery.child`, before the worker forks its zygote or any child) on a stage
of the real types: a :class:`~.runtime.Mailbox` on a pipe of its own (the frames written before it
reads them), a key state, a start, calls, a cast and a stop through :func:`~.runtime.serve`, each
:data:`REHEARSALS` times. Every keyed process then shares that code, as it shares the rest of its
worker's memory (``docs/benchmarks.rst``: row 6, USS per keyed process). The async side does the
same for its own code (:func:`.aio.rehearse`).
"""

from __future__ import annotations

from typing import Any

import billiard

from ..core import process
from ..core.conf import ChildConfig
from ..core.messages import Call, Cast
from ..core.pipe import Assign, StopChild
from ..core.process import KeyedProcess
from ..core.protocol import encode, encode_message
from . import runtime
from .state import KeyState

__all__ = ["REHEARSALS", "rehearse"]

#: How many times :func:`rehearse` runs a keyed process's life: past CPython 3.11's warm-up (8).
REHEARSALS = 16


class _Rehearsed(KeyedProcess):
    def init(self, key: str, *args: Any) -> None:
        self.casts = 0

    def handle_call(self, msg: Any) -> Any:
        return msg

    def handle_cast(self, msg: Any) -> None:
        self.casts += 1


class _AsyncRehearsed(KeyedProcess):
    async def handle_call(self, msg: Any) -> Any:
        return msg


def _frames(max_size: int) -> list[bytes]:
    """What a worker writes to a keyed process: calls and a cast, a call alone, then a stop."""
    msgs = [encode_message(Call("", "", 0, "rehearsal", f"c{i}").to_wire(), "message", max_size, payload=i)
            for i in range(2)]
    msgs.append(encode_message(Cast.envelope("", "", 0), "message", max_size, payload="cast"))
    # A frame of one call too: a caller's calls come so (PipeEnd.read decodes it whole at once).
    return [encode(msgs), encode(msgs[:1]), encode([StopChild("rehearsal").to_wire()])]


def rehearse() -> None:
    """Run a keyed process's start, messages and stop :data:`REHEARSALS` times on a stage: a sync
    one, and an async one whose hooks never await (:func:`.runtime.serve_async`, once set)."""
    config = ChildConfig()
    frames = _frames(config.max_message_size)
    mailbox, state = process._mailbox, process._state
    ours, theirs = billiard.Pipe(duplex=True)
    try:
        for _ in range(REHEARSALS):
            for target, serve in ((_Rehearsed, runtime.serve), (_AsyncRehearsed, runtime.serve_async)):
                if serve is None:
                    continue
                box = runtime.Mailbox(theirs, max_size=config.max_message_size)
                for frame in frames:  # small: the pipe holds them all, the mailbox reads them as it waits
                    ours.send_bytes(frame)
                serve(box, target, "", [], KeyState(box, config, target, Assign("", "", [])))
                while ours.poll(0):
                    ours.recv_bytes()
    finally:
        process._mailbox, process._state = mailbox, state
        ours.close()
        theirs.close()
