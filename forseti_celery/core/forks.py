"""Which fork of its lineage this process is: a counter raised in every child a fork makes.

Whatever a process keeps that a forked child must not share (a client, a kept broker
connection) remembers the count it was made at and is made again where the count differs:
one comparison per use, where ``os.getpid()`` is a system call (several microseconds here).
"""

from __future__ import annotations

import os

__all__ = ["count"]

_count = 0


def _forked() -> None:
    global _count
    _count += 1


os.register_at_fork(after_in_child=_forked)


def count() -> int:
    """Forks this process came out of (0 in a process that was not forked since this import)."""
    return _count
