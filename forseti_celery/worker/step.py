"""The worker bootstep: a thin adapter that runs a :class:`~forseti_celery.worker.node.Node`
in every worker of an app with ``Forseti`` installed.

``Forseti(app)`` adds it to ``app.steps['worker']`` by name, so only a worker imports the worker
side; it answers the remote-control commands (:mod:`forseti_celery.control`) and gives the
worker's stats their ``forseti`` section (:func:`stats`), read from the node in Celery's main
thread.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from celery import bootsteps

from ..core import installs
from . import control
from .node import Node

__all__ = ["RegistryStep"]


class RegistryStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep running a :class:`Node` (added to ``app.steps['worker']`` by ``Forseti``)."""

    label = "forseti"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.node: Node | None = None
        parent.forseti = self  # how remote control finds it (forseti_celery.control), as ``c.heart`` in Celery

    def create(self, parent: Any) -> RegistryStep:
        return self

    def start(self, parent: Any) -> None:
        node = Node(installs.of(parent.app), parent.hostname)
        node.start()  # DuplicateWorker: Celery logs "Unrecoverable error" and exits with code 1
        self.node = node

    def stop(self, parent: Any) -> None:
        if self.node is not None:
            self.node.stop()
            self.node = None

    def terminate(self, parent: Any) -> None:
        if self.node is not None:
            self.node.stop(grace=1.0)
            self.node = None

    def keys(self, name: str | None) -> dict[str, Any]:
        """``celery inspect forseti_keys``: only called while the node runs."""
        assert self.node is not None
        return control.keys(self.node, name)

    def stop_key(self, key: str, name: str) -> dict[str, Any]:
        """``celery control forseti_stop``: only called while the node runs."""
        assert self.node is not None
        return control.stop_key(self.node, key, name)

    def rebalance(self, timeout: float | None = None) -> list[dict[str, str]]:
        """``celery forseti rebalance`` (the ``forseti_rebalance`` command): on the leader, move
        movable keys until every eligible worker's count differs by at most one, waiting ``timeout``
        seconds at most (None: forseti_handoff_timeout); what moved, ``{"name", "key", "source",
        "target"}`` each. Elsewhere: nothing (``[]``). Only called while the node runs."""
        assert self.node is not None
        return self.node.leader.rebalancer.request(timeout) if self.node.leader.active else []

    def info(self, parent: Any) -> dict[str, Any]:
        """The worker's stats: ``forseti`` for programs, and the same as rows of text for people."""
        section = stats(self.node) if self.node is not None else {"running": False}
        return {**_readable(section), "forseti": section}


def stats(node: Node) -> dict[str, Any]:
    """The ``forseti`` section of ``celery inspect stats``: what ``node`` runs, and its role."""
    procs = node.children.snapshot()
    return {
        "namespace": node.settings.namespace,
        "leader": node.leader.ready,
        "eligible": node.eligible,
        "processes": dict(Counter(c.name for c in procs)),
        "total": len(procs),
        "spares": node.children.spares,
        "starts": node.children.starts,
        "exits": node.children.exits,
        # Restarts (restart policies) of the keys running here, by the count each carries.
        "restarts": sum(c.restarts for c in procs),
        "epoch": node.epoch,
        "members": sorted(m.hostname for m in node.members),
        # Worker messages without a valid signature, per reason (None: no worker secret set).
        "dropped": None if node.signer is None else dict(node.signer.dropped),
        **({"table": node.leader.info()} if node.leader.active else {}),
    }


def _readable(section: dict[str, Any]) -> dict[str, str]:
    """``section`` as flat rows of text: Flower shows each top-level stats key as a row of its
    worker page's "Other" tab, and a nested section as one Python ``repr``."""
    if "leader" not in section:
        return {"forseti role": "not running"}
    table = section.get("table")
    if not section["leader"]:
        role = f"member (leader epoch {section['epoch']})"
    elif table is None or not table["ready"]:
        role = f"leader (epoch {section['epoch']}), rebuilding its table"
    else:
        role = f"leader (epoch {section['epoch']}), {table['keys']} keys in the cluster"
    by_name = ", ".join(f"{n} {c}" for n, c in sorted(section["processes"].items()))
    return {
        "forseti namespace": section["namespace"],
        "forseti role": role,
        "forseti new keys": "placed here" if section["eligible"] else "not placed here (forseti_nodes)",
        "forseti keys": f"{section['total']}: {by_name}" if by_name else "0",
        "forseti spares": str(section["spares"]),
        "forseti starts": f"{section['starts']} started, {section['exits']} exited",
        "forseti restarts": f"{section['restarts']} (of the keys running here)",
        "forseti members": f"{len(section['members'])}: {', '.join(section['members'])}",
    }
