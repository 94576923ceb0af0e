"""The client's cache of live refs, which makes ``get_key`` of a known key free.

An entry is dropped as soon as its process's exit is known: the exit event the
worker sends (received on a queue of the client's own, bound to Celery's event
exchange), the leader's event that a worker is lost, a call that finds the
process gone or crashed, or a stop; a new leader empties the cache. While the
client is not subscribed to exit events (before its first connection, after a
disconnect) nothing is cached, since an exit could go unseen, nor is an answer to a request sent
before the subscription (the process may have ended unheard meanwhile). An exit noticed
while an answer was on its way is remembered briefly so the stale answer is
not cached.
"""

from __future__ import annotations

import threading
from collections import deque

from ..core.keyref import KeyRef

__all__ = ["RefCache"]

_Key = tuple[str, str]


class RefCache:
    """``(name, key) -> KeyRef`` of live processes; safe from many threads."""

    def __init__(self, enabled: bool, remember: int = 4096) -> None:
        self.enabled = enabled
        self._refs: dict[_Key, KeyRef] = {}
        self._recent_exits: deque[tuple[str, int]] = deque(maxlen=remember)
        self._lock = threading.Lock()
        self._ready = False
        self._epoch = 0  # subscriptions so far: an answer is cached only if asked within the current one

    def epoch(self) -> int:
        """What a request sent now hands :meth:`put` with its answer."""
        return self._epoch if self._ready else -1

    def get(self, name: str, key: str) -> KeyRef | None:
        """The cached live ref, if any."""
        return self._refs.get((name, key)) if self._ready else None

    def lookup(self, name: str, key: str) -> tuple[KeyRef | None, int]:
        """The cached live ref, if any, and (on a miss, for its answer) the :meth:`epoch`."""
        return self.get(name, key), self.epoch()

    def put(self, ref: KeyRef, asked: int | None = None) -> None:
        """Remember ``ref`` unless its exit has been seen already, or (``asked``: the :meth:`epoch`
        of its request) it answers a request sent while exits went unheard."""
        with self._lock:
            if self._ready and asked in (None, self._epoch) and (ref.node, ref.pid) not in self._recent_exits:
                self._refs[(ref.name, ref.key)] = ref

    def exited(self, name: str, key: str, node: str, pid: int) -> None:
        """The process ``pid`` on ``node`` has ended."""
        with self._lock:
            self._recent_exits.append((node, pid))
            ref = self._refs.get((name, key))
            if ref is not None and (ref.node, ref.pid) == (node, pid):
                del self._refs[(name, key)]

    def node_lost(self, node: str) -> None:
        """Every process on ``node`` has ended (the leader declared it dead or it left)."""
        with self._lock:
            for k in [k for k, ref in self._refs.items() if ref.node == node]:
                del self._refs[k]

    def found(self, name: str, key: str, ref: KeyRef | None, asked: int | None = None) -> None:
        """The leader's answer to a lookup, which is the truth: cache it, or forget the key."""
        if ref is not None:
            self.put(ref, asked)
            return
        with self._lock:
            self._refs.pop((name, key), None)

    def forget(self, ref: KeyRef) -> None:
        """Drop ``ref`` (a call found it gone, or it was stopped)."""
        self.exited(ref.name, ref.key, ref.node, ref.pid)

    def clear(self) -> None:
        """Forget everything (a new leader: it may have declared dead workers it never announced)."""
        with self._lock:
            self._refs.clear()

    def subscribed(self, ready: bool) -> None:
        """Exit events are (or are no longer) being received; either way, start empty."""
        with self._lock:
            self._refs.clear()
            self._ready = ready and self.enabled
            self._epoch += 1
