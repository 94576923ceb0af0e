"""The leader's check of a worker's registry against its table (a :class:`Report` it asked for
once the table is ready, see :meth:`Leader.heartbeat <.leader.Leader.heartbeat>`): lost start
reports recorded, lost orders placed again, lost exit reports freed. Runs in the leader's
consumer thread, on the leader's own fields.
"""

from __future__ import annotations

from typing import Any, Protocol

from celery.utils.log import get_logger

from ..core.worker_messages import Report
from .keytable import Entry, Key, KeyTable, Waiters, reported_entries
from .membership import Members

logger = get_logger(__name__)

__all__ = ["reconcile"]


class Leader(Protocol):
    """What of the :class:`~.leader.Leader` a reconciliation reads and calls."""

    members: Members
    _asked: dict[str, float]
    _counts: dict[str, int]
    _keys: KeyTable

    def _started(self, k: Key, entry: Entry, pid: int, answer_all: bool = False) -> None: ...

    def _start(self, k: Key, args: list[Any] | None, waiters: Waiters, prior: Entry | None = None) -> None: ...

    def _record(self, node: str, k: Key, entry: Entry) -> None: ...


def reconcile(leader: Leader, host: str, msg: Report) -> None:
    """Bring the table's entries of worker ``host`` in line with its registry ``msg``."""
    leader._asked.pop(host, None)
    if host not in leader.members:
        return
    leader._counts.setdefault(host, 0)
    reported = {(name, key): (pid, sid) for name, key, pid, sid in msg.procs}
    known = dict(reported_entries(msg))
    for k in list(leader._keys.by_node.get(host, ())):
        entry = leader._keys.entries[k]
        if entry.seq >= msg.q:
            continue  # recorded after the question: the answer cannot know it yet
        pid, sid = reported.get(k, (None, None))
        if entry.pid is None:
            if pid is not None:
                entry.sid = sid
                leader._started(k, entry, pid, answer_all=True)  # its start report (and answers?) were lost
            elif sid != entry.sid:
                # Its order was lost, or refused: place it again, for whoever still waits.
                logger.info("forseti: %r never started on %s; placed again", k, host)
                leader._keys.forget(k, entry)
                if entry.wanted:
                    leader._start(k, entry.args, entry.waiters, entry)
        elif pid != entry.pid:
            logger.info("forseti: %r is no longer on %s; freed", k, host)
            leader._keys.forget(k, entry)  # its exit report was lost
    for k, (pid, _) in reported.items():
        if pid is not None:
            leader._record(host, k, known[k])
