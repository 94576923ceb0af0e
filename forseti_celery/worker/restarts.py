"""Restart policies, in OTP's words: whether the leader restarts a key whose process ended, after
which back-off, and when it gives up (the restart intensity).

``temporary``: never. ``transient``: after an abnormal end (a crash, a kill or a signal, its
worker died, was fenced or shut down), not after ``stop()``, a normal return or passivation.
``permanent``: after any end but ``stop()``. A process whose ``init`` never finished is not
restarted: its caller gets ``StartError`` as before. The back-off is 0.1 s doubling with each
restart within ``restart_window``, at most 10 s; more than ``max_restarts`` restarts within the
window and the key stays down (see docs/lifecycle.rst, Restarts).

Owned by the :class:`~forseti_celery.worker.leader.Leader`, in its consumer thread: no lock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from celery.utils.log import get_logger

from ..core.names import EVENT_GIVEN_UP, EVENT_RESTARTED
from .keytable import Entry

if TYPE_CHECKING:
    from ..core.conf import KeyPolicy
    from ..core.installs import Installed
    from .pool.table import Child

logger = get_logger(__name__)

__all__ = ["BACKOFF_FIRST", "BACKOFF_MAX", "WORKER_LOST", "Intensity", "Restarts", "keep", "policy_of",
           "wants_restart"]

Policy = Callable[[str], "KeyPolicy | None"]

#: Seconds before the first restart within a window, doubled by each later one, at most :data:`BACKOFF_MAX`.
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 10.0
#: The reason of an end the leader learns from a worker's death, not from an exit report.
WORKER_LOST = "worker lost"
#: Ends no policy restarts: asked for (``stop()``, ``celery forseti stop``), or the leader's own
#: stop of a second process of a key after a split brain.
_STOPPED = frozenset({"stop", "duplicate"})
#: Ends that are normal: a function-form process returned (or ``sys.exit(0)``), or it passivated.
_NORMAL = frozenset({"normal", "idle"})

Key = tuple[str, str]


def wants_restart(restart: str, reason: str) -> bool:
    """Whether a key of policy ``restart`` is restarted after its process ended for ``reason``
    (an exit event's reason, or :data:`WORKER_LOST`). A reason no version of forseti writes
    (a newer worker's) is an abnormal end."""
    if restart not in ("transient", "permanent") or reason in _STOPPED:
        return False
    return restart == "permanent" or reason not in _NORMAL


def policy_of(forseti: Installed) -> Callable[[str], KeyPolicy | None]:
    """The leader's reader of a name's policy (None where it cannot be read: never restarted)."""
    def policy(name: str) -> KeyPolicy | None:
        try:
            return forseti.policy(name)
        except Exception:
            logger.exception("forseti: no restart policy for %r; its keys are not restarted", name)
            return None
    return policy


class Intensity:
    """The restarts of each key within its window: the next back-off, or none (give up).

    A new leader starts with no history: each key gets ``max_restarts`` restarts within its first
    window after a failover (their total, shown by ``celery forseti keys``, goes on).
    """

    def __init__(self) -> None:
        #: Key -> (its window in seconds, the times of its restarts within it, oldest first).
        self._times: dict[Key, tuple[float, deque[float]]] = {}

    def next(self, k: Key, max_restarts: int, window: float, now: float) -> float | None:
        """Count a restart of ``k`` at ``now`` (``time.monotonic()``): its back-off in seconds, or
        None when ``k`` has had ``max_restarts`` restarts within ``window`` already."""
        _, times = self._times.setdefault(k, (window, deque()))
        self._times[k] = (window, times)
        while times and times[0] <= now - window:
            times.popleft()
        if len(times) >= max_restarts:
            return None
        backoff = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** len(times))
        times.append(now)
        return backoff

    def within(self, k: Key) -> int:
        """Restarts of ``k`` counted in its current window."""
        entry = self._times.get(k)
        return 0 if entry is None else len(entry[1])

    def sweep(self, now: float) -> None:
        """Forget the keys whose last restart is out of their window."""
        for k in [k for k, (window, times) in self._times.items() if not times or times[-1] <= now - window]:
            del self._times[k]

    def clear(self) -> None:
        self._times.clear()


class Restarts:
    """The leader's restart decisions: a name's ``policy`` (None: never restarted), the intensity,
    and what it tells monitors (``event``: the worker's event sender)."""

    def __init__(self, policy: Policy, event: Callable[..., None]) -> None:
        self.policy = policy
        self._event = event
        self._intensity = Intensity()
        #: The keys the leader's worker last said it runs (its heartbeat's ``keep``), by hostname:
        #: a successor restarts them if it dies before it reported them (no one else knew them).
        self._leaders_keys: dict[str, list[list[Any]]] = {}
        #: Restarts ordered and keys given up in this term (``celery inspect stats``).
        self.restarted = self.given_up = 0

    def after(self, k: Key, entry: Entry, reason: str) -> float | None:
        """``k``'s process (``entry``, forgotten) ended for ``reason``: the back-off of its restart,
        or None when it is not restarted (its policy, or the intensity: it stays down)."""
        policy = self.policy(k[0])
        if policy is None or not wants_restart(policy.restart, reason):
            return None
        if entry.args is None:  # reported by a worker older than the args field
            logger.warning("forseti: %r not restarted: its init args are unknown", k)
            return None
        backoff = self._intensity.next(k, policy.max_restarts, policy.restart_window, time.monotonic())
        if backoff is None:
            logger.warning("forseti: %r ended (%s) after %d restarts within %g s (max_restarts %d); it stays down",
                           k, reason, self._intensity.within(k), policy.restart_window, policy.max_restarts)
            self.give_up(k, entry.restarts, reason)
            return None
        self.restarted += 1
        logger.info("forseti: %r ended (%s); restarting it in %.3g s", k, reason, backoff)
        return backoff

    def started(self, k: Key, entry: Entry) -> None:
        """The restart ``entry`` of ``k`` has started (its pid known)."""
        logger.info("forseti: %r restarted on %s (pid %s; restart %d, after: %s)", k, entry.node, entry.pid,
                    entry.restarts, entry.restarting)
        self._event(EVENT_RESTARTED, name=k[0], key=k[1], node=entry.node, child_pid=entry.pid,
                    restarts=entry.restarts, reason=entry.restarting)
        entry.restarting = None

    def give_up(self, k: Key, restarts: int, reason: str) -> None:
        """``k`` stays down: counted, and told to monitors (the caller logs why)."""
        self.given_up += 1
        self._event(EVENT_GIVEN_UP, name=k[0], key=k[1], restarts=restarts, reason=reason)

    def heard(self, node: str, leads: bool, keep: Any) -> None:
        """A heartbeat of ``node``: while it leads, the keys its own worker runs (``keep``); only
        the latest leader's are kept (an older one's would name keys restarted since)."""
        if leads and type(keep) is list:
            self._leaders_keys = {node: keep}
        else:
            self._leaders_keys.pop(node, None)

    def orphans(self, node: str) -> list[tuple[Key, Entry]]:
        """The keys leader ``node`` last said its own worker ran (forgotten here): what a successor
        that never had its report restarts when it dies. A malformed entry is skipped."""
        orphans = []
        for item in self._leaders_keys.pop(node, ()):
            if type(item) is list and len(item) == 4 and type(item[0]) is str and type(item[1]) is str \
                    and type(item[2]) is list and type(item[3]) is int:
                orphans.append(((item[0], item[1]), Entry(node, "", item[2], 0, restarts=item[3])))
        return orphans

    def leaders(self) -> list[str]:
        """The workers whose latest heartbeat said they lead (with the keys of their own worker)."""
        return list(self._leaders_keys)

    def sweep(self, now: float) -> None:
        self._intensity.sweep(now)

    def clear(self) -> None:
        self._intensity.clear()


def keep(children: Iterable[Child], policy: Policy) -> list[list[Any]]:
    """``[name, key, args, restarts]`` of each started process in ``children`` whose name's policy
    restarts it after its worker's death: what a leader's heartbeat says its own worker runs."""
    kept, restarted = [], {}
    for c in children:
        if c.name not in restarted:
            p = policy(c.name)
            restarted[c.name] = p is not None and wants_restart(p.restart, WORKER_LOST)
        if restarted[c.name] and c.started and c.args is not None:
            kept.append([c.name, c.key, c.args, c.restarts])
    return kept
