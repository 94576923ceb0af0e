"""Handoff, the leader's side: a key whose process handed its state off starts on another worker
with it (see :mod:`~forseti_celery.worker.handoff` for the worker's side, ``docs/state.rst``).

The handed-off process's exit report (reason ``handoff``) carries its state. Only then, with the
key free in the table, does the leader order its next process (:func:`exited` says what it
carries): on the worker the
``move`` named if it is live, eligible and knows the name, else on the least-used eligible one
(:func:`place`; a leaving worker is excluded at once: it is never eligible again). The ``Spawn``
carries the state, and so does the table's entry until the process has started: if its worker
refuses it or dies first, the key is placed again with it (:attr:`Entry.wanted
<.keytable.Entry.wanted>`). With no worker left to take it, the state is lost (logged); a
checkpoint, if any, is what the key comes back with (``forseti_state_url``).

Runs in the leader's consumer thread.
"""

from __future__ import annotations

import time

from celery.utils.log import get_logger

from ..core.worker_messages import Exited
from .keytable import Key, KeyTable, Moving
from .membership import Members

logger = get_logger(__name__)

__all__ = ["exited", "place", "spawn_fields"]


def exited(members: Members, k: Key, msg: Exited) -> Moving:
    """``msg``: the process of ``k`` handed off (the caller has freed the key); what its next
    process, which the caller starts now, is to carry."""
    if msg.to is None:
        members.exclude(msg.node)  # a warm shutdown: the leaving worker takes no key
    if msg.state is None:
        logger.warning("forseti: %r handed off from %s without its state; started afresh", k, msg.node)
    return Moving(msg.state, msg.node, msg.since if msg.since is not None else time.time(), msg.to)


def place(members: Members, keys: KeyTable, k: Key, moving: Moving) -> str | None:
    """Where a handed-off key goes: its move's target if it can take it, else the least-used
    eligible worker (its source only if no other one is)."""
    m = members.get(moving.target) if moving.target is not None else None
    if m is not None and m.eligible and k[0] in m.names:
        return m.hostname
    node = keys.least_used(members, k[0], avoid=moving.source)
    if node is None:
        logger.warning("forseti: no worker takes %r handed off from %s: its state is lost", k, moving.source)
    return node


def spawn_fields(moving: Moving | None) -> tuple[bytes | None, str | None, float | None]:
    """The ``state``, ``source`` and ``since`` of the ``Spawn`` of a key's next process."""
    return (None, None, None) if moving is None else (moving.state, moving.source, moving.since)
