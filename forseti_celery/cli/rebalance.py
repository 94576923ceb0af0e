"""``celery forseti rebalance``: the leader moves movable keys onto the workers that run fewest, now."""

from __future__ import annotations

from typing import Any

import click
from celery.bin.base import CeleryCommand

from .cluster import cluster_of
from .support import EXIT_ERROR, EXIT_UNAVAILABLE, connect, count, fail, forseti_client, options, print_json

__all__ = ["rebalance"]

#: Seconds the command waits for the leader's answer beyond the bound it gives the moves.
REPLY_MARGIN = 5.0
#: Seconds to find the leader (its metrics, the workers' stats), at most.
FIND_LEADER = 5.0


@click.command(cls=CeleryCommand)
@options(30.0, "Seconds the leader may take to move keys (then it stops and answers what moved).")
@click.pass_obj
def rebalance(obj: Any, as_json: bool, timeout: float) -> None:
    """Move movable keys until worker counts differ by at most one; print what moved.

    Asks the leader (remote control forseti_rebalance). Each move is a handoff: the
    process takes its snapshot, ends, and starts on the target with it; messages
    sent meanwhile wait and follow. Prints one line per moved key, NAME KEY
    SOURCE -> TARGET. Exits 3 when no leader answers in time, 4 when it refuses.
    """
    with forseti_client(obj, as_json) as f:
        namespace = f.settings.namespace
        _, workers = cluster_of(obj, f, min(timeout, FIND_LEADER))
        leader = next((host for host, s in workers.items() if s and s.get("leader")), None)
        if leader is None:
            fail(obj, as_json, EXIT_UNAVAILABLE, "no_answer",
                 f"no worker of namespace {namespace!r} said it leads (workers: {', '.join(workers) or 'none'})")
        with connect(obj) as conn:
            replies = obj.app.control.broadcast(
                "forseti_rebalance", arguments={"timeout": timeout}, destination=[leader], reply=True,
                timeout=timeout + REPLY_MARGIN, limit=1, connection=conn,
            )
    body = next((b for reply in replies or () for host, b in reply.items() if host == leader), None)
    if body is None:
        fail(obj, as_json, EXIT_UNAVAILABLE, "no_answer",
             f"the leader {leader} did not answer within {timeout + REPLY_MARGIN:g} s")
    if not isinstance(body, dict) or not isinstance(body.get("ok"), dict):
        error = body.get("error", body) if isinstance(body, dict) else body
        fail(obj, as_json, EXIT_ERROR, "refused", f"the leader {leader} refused: {error}")
    moved: list[dict[str, Any]] = list(body["ok"].get("moved") or ())
    if as_json:
        print_json(obj, {"namespace": namespace, "leader": leader, "moved": moved})
        return
    for m in moved:
        obj.echo(f"{m['name']} {m['key']} {m['source']} -> {m['target']}")
    obj.echo(f"{count(len(moved), 'key')} moved (leader {leader})" if moved
             else f"nothing to move (leader {leader}): the workers' counts of movable keys differ by at most one")
