"""The client's route table of key-addressed messages: where its next message to a key goes.

``forseti_celery.call/send`` address a key. The first message to a key goes to the
ref ``get_key`` gives (the cache's, or the leader's); later ones follow the key's
*route*: that ref, and the sequence number of the last message sent on it. A
route changes only when that cannot reorder this client's messages to the key:

* a ``moved`` notice from the route's worker whose ``q`` covers the last message
  sent on the route (the worker has forwarded everything this client sent there
  for the key, so nothing is left behind in the funnel to be overtaken);
* the route's worker declared dead or gone (the node-lost event, heard with ``forseti_cache`` on or
  off: a key sent nothing while its worker handed it off gets no notice), a new leader or
  a lost subscription to exit events (a dead worker may have gone unannounced):
  the next message resolves the key again;
* the exit of the route's process when nothing on the route is outstanding: every
  message sent on it was a call, already answered; else, :data:`LINGER` seconds
  after the last message sent on it (the old worker has long forwarded it), so
  that a client does not keep a route for every key it ever sent to.

One lock guards the table; the caller's threads and the client's consumer thread
(notices, exit events) take it briefly and never block under it.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from ..core.keyref import KeyRef

__all__ = ["LINGER", "Route", "RouteTable"]

#: Seconds a route whose process has ended is kept after the last message sent on it: as long as
#: the old worker redirects what still reaches it (``worker.forwarding.REDIRECT_FOR``).
LINGER = 60.0

_Key = tuple[str, str]


class Route:
    """Where a key's messages go: ``ref``, with the seq of the last message sent on it."""

    __slots__ = ("at", "calls", "casts", "ended", "last", "ref")

    def __init__(self, ref: KeyRef) -> None:
        self.ref = ref
        self.last = 0  #: seq of the last message sent on this route (0: none yet)
        self.at = 0.0  #: when (monotonic) that message was sent
        self.casts = False  #: a send went this way: its order must be kept until a notice covers it
        self.calls = 0  #: calls sent on this route and not answered yet
        self.ended = False  #: its process has exited (the route lingers, see LINGER)


class RouteTable:
    """``(name, key) -> Route``, and this client's sequence numbers; safe from many threads."""

    def __init__(self, linger: float = LINGER) -> None:
        self._routes: dict[_Key, Route] = {}
        self._seq = 0
        self._lock = threading.Lock()
        self._linger = linger
        #: Routes whose process ended while something was outstanding on them, oldest first.
        self._ended: deque[tuple[_Key, Route]] = deque()

    def get(self, name: str, key: str) -> Route | None:
        """The key's route, if it has one."""
        return self._routes.get((name, key))

    def open(self, ref: KeyRef) -> None:
        """Open a route to ``ref`` for its key, unless another thread opened one meanwhile."""
        with self._lock:
            self._routes.setdefault((ref.name, ref.key), Route(ref))

    def take(self, name: str, key: str, cast: bool) -> tuple[Route, int] | None:
        """The key's route and a new sequence number for a message about to go along it (a
        cast, or a call, which :meth:`answered` settles); None if the key has no route.

        One step under the lock: a notice cannot move the route between the two, and once
        the message's number is the route's last, no notice moves it before that message
        has reached the old worker (it must cover the number)."""
        with self._lock:
            route = self._routes.get((name, key))
            if route is None:
                return None
            self._seq += 1
            route.last = self._seq
            route.at = time.monotonic()
            if cast:
                route.casts = True
            else:
                route.calls += 1
            return route, self._seq

    def answered(self, route: Route, ended: bool = False, settled: bool = True) -> None:
        """A call sent along ``route`` has its answer (or its caller gave up); ``ended``: the
        answer says its process has ended (it crashed), as its exit event will (:meth:`exited`).
        ``settled=False``: given up unanswered (a timeout, a cancelled task), the call may still be
        on its way; the route then keeps its order until a notice covers it, as for a send."""
        with self._lock:
            route.calls -= 1
            if not settled:
                route.casts = True
            k = (route.ref.name, route.ref.key)
            if ended and not route.casts and not route.calls and self._routes.get(k) is route:
                del self._routes[k]

    def moved(self, name: str, key: str, old_node: str, old_pid: int, new: KeyRef, seq: int) -> bool:
        """A ``moved`` notice: the worker of ``old_pid`` forwarded this client's messages up to
        ``seq`` to ``new``. Switch to ``new`` if that covers the route; return whether it did."""
        with self._lock:
            route = self._routes.get((name, key))
            if route is None or (route.ref.node, route.ref.pid) != (old_node, old_pid) or seq < route.last:
                # No route, already elsewhere (an older notice), or messages still on their way to
                # the old worker: it forwards them too and sends another notice.
                return False
            fresh = Route(new)
            fresh.last = route.last
            self._routes[(name, key)] = fresh
            return True

    def drop(self, ref: KeyRef) -> None:
        """Forget the route of ``ref``'s key if it still goes to ``ref`` (a call found it gone)."""
        with self._lock:
            route = self._routes.get((ref.name, ref.key))
            if route is not None and route.ref == ref:
                del self._routes[(ref.name, ref.key)]

    def exited(self, name: str, key: str, node: str, pid: int) -> None:
        """Process ``pid`` on ``node`` ended: its route goes if nothing on it is outstanding,
        else :data:`LINGER` seconds after the last message sent on it."""
        with self._lock:
            route = self._routes.get((name, key))
            if route is not None and (route.ref.node, route.ref.pid) == (node, pid):
                if not route.casts and not route.calls:
                    del self._routes[(name, key)]
                elif not route.ended:
                    route.ended = True
                    self._ended.append(((name, key), route))
            self._sweep()

    def _sweep(self) -> None:
        """Drop the ended routes unused for :data:`LINGER` seconds (with the lock held). Only the
        oldest is looked at: one written to after its end is moved soon, by a notice."""
        now = time.monotonic()
        while self._ended:
            k, route = self._ended[0]
            if self._routes.get(k) is route:
                if now - route.at < self._linger:
                    return
                del self._routes[k]
            self._ended.popleft()

    def node_lost(self, node: str) -> None:
        """Every process on ``node`` has ended and nothing there will forward: forget its routes."""
        with self._lock:
            for k in [k for k, route in self._routes.items() if route.ref.node == node]:
                del self._routes[k]

    def clear(self) -> None:
        """Forget every route (a new leader, or exit events unheard for a while)."""
        with self._lock:
            self._routes.clear()

    def __len__(self) -> int:
        return len(self._routes)
