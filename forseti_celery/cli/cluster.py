"""``celery forseti status`` and ``celery forseti keys``: the cluster as its leader and workers see it."""

from __future__ import annotations

from collections import Counter
from typing import Any

import click
from celery.bin.base import COMMA_SEPARATED_LIST, CeleryCommand, CeleryOption
from celery.utils.time import humanize_seconds

from ..app import Forseti
from .support import (
    EXIT_UNAVAILABLE,
    broker_uri,
    by_name,
    connect,
    count,
    exit_on_errors,
    fail,
    forseti_client,
    options,
    print_json,
    stats_of,
    table,
    yes,
)

__all__ = ["cluster_of", "keys", "status"]


@click.command(cls=CeleryCommand)
@options(1.0, "Seconds to wait for the leader and for the workers' stats.")
@click.pass_obj
def status(obj: Any, as_json: bool, timeout: float) -> None:
    """Show the leader, the keyed processes of every worker, and totals.

    Exits 3 when no leader of the app's namespace answers.
    """
    with forseti_client(obj, as_json) as f:
        namespace = f.settings.namespace
        metrics, workers = cluster_of(obj, f, timeout)
    leaders = [h for h, s in workers.items() if s and s.get("leader")]
    processes: Counter[str] = Counter()
    for s in workers.values():
        processes.update((s or {}).get("processes", {}))
    total = sum(processes.values())
    leader = leaders[0] if leaders else None
    summary = {
        "namespace": namespace,
        "leader": leader,
        "workers": workers,
        "metrics": metrics,
        "total": total,
        "processes": dict(processes),
    }
    if as_json:
        print_json(obj, summary)
        return
    epoch = (workers[leader] or {}).get("epoch") if leader else None
    obj.echo(f"namespace {namespace}: leader {leader or 'unknown (no worker claims it yet)'}"
             + (f" (epoch {epoch})" if epoch is not None else ""))
    obj.echo()
    rows = []
    for host, s in workers.items():
        if s is None:
            rows.append([host, "?", "?", metrics.get(host, "?"), "?", "?", "no answer to stats"])
        else:
            rows.append([host, "*" if s.get("leader") else "", yes(s.get("eligible")), s.get("total", 0),
                         s.get("starts", 0), s.get("exits", 0), by_name(s.get("processes", {}))])
    table(obj, ["NODE", "LEADER", "ELIGIBLE", "PROCESSES", "STARTS", "EXITS", "BY NAME"], rows)
    obj.echo()
    obj.echo(f"{count(len(workers), 'worker')}, {count(total, 'keyed process')} "
             f"({by_name(processes)})")


def cluster_of(obj: Any, f: Forseti, timeout: float) -> tuple[dict[str, int], dict[str, dict[str, Any] | None]]:
    """The leader's metrics, and the ``forseti`` stats section of every worker of the namespace
    (``None``: no answer), by hostname, sorted."""
    metrics = f.get_metrics(timeout=timeout)  # no leader: the client's timeout names namespace and broker
    # Ask only this namespace's workers (others may share the broker): the leader's eligible
    # workers first, then any other member they know of (non-eligible workers).
    stats = stats_of(obj.app, set(metrics), timeout)
    hosts = set(metrics).union(*((s.get("forseti") or {}).get("members", ()) for s in stats.values()))
    if hosts - set(stats):
        stats.update(stats_of(obj.app, hosts - set(stats), timeout))
    return metrics, {h: (stats.get(h) or {}).get("forseti") for h in sorted(hosts)}


@click.command(cls=CeleryCommand)
@click.option("--node", "nodes", cls=CeleryOption, type=COMMA_SEPARATED_LIST, help_group="Keyed Process Options",
              help="Only these workers (comma-separated hostnames).")
@click.option("--name", cls=CeleryOption, help_group="Keyed Process Options",
              help="Only keyed processes of this name.")
@options(1.0, "Seconds to wait for the workers' answers.")
@click.pass_obj
def keys(obj: Any, nodes: list[str] | None, name: str | None, as_json: bool, timeout: float) -> None:
    """List keyed processes: node, name, key, pid, uptime, messages, restarts.

    Asks every worker on the broker (or only the --node ones) and keeps those of
    the app's namespace. Exits 3 when no worker of the app's namespace (or not every --node) answers.
    """
    with exit_on_errors(obj, as_json):
        namespace = Forseti.of(obj.app).settings.namespace
        with connect(obj) as conn:
            replies = obj.app.control.broadcast(
                "forseti_keys", arguments={"name": name} if name else {}, destination=nodes or None,
                reply=True, timeout=timeout, limit=len(nodes) if nodes else None, connection=conn,
            )
    answered: list[str] = []
    elsewhere: dict[str, str] = {}  # --node workers that answered for another namespace
    rows: list[dict[str, Any]] = []
    for reply in replies or ():
        for host, body in reply.items():
            # Every worker on the broker answers a broadcast: keep the app's namespace.
            if isinstance(body, dict) and body.get("namespace") == namespace:
                answered.append(host)
                rows.extend({"node": host, **k} for k in body["keys"])
            elif isinstance(body, dict):
                elsewhere[host] = (f"it serves namespace {body['namespace']!r}" if "namespace" in body
                                   else str(body.get("error", body)))
    rows.sort(key=lambda r: (r["node"], r["name"], r["key"]))
    missing = sorted(set(nodes or ()) - set(answered))
    if answered and not missing:
        if as_json:
            print_json(obj, rows)
        else:
            table(obj, ["NODE", "NAME", "KEY", "PID", "UPTIME", "MESSAGES", "RESTARTS"],
                   [[r["node"], r["name"], r["key"], r["pid"] if r["started"] else f"{r['pid']} (starting)",
                     humanize_seconds(r["uptime"], microseconds=True), r["messages"],
                     r.get("restarts", 0)] for r in rows])  # (0: a worker older than restarts)
            obj.echo(f"\n{count(len(rows), 'keyed process')} on {count(len(answered), 'worker')}")
        return
    if not missing:
        message = f"no worker of namespace {namespace!r} on {broker_uri(obj)} answered within {timeout:g} s"
    else:
        silent = [host for host in missing if host not in elsewhere]
        message = "; ".join(
            ([f"no answer within {timeout:g} s from {', '.join(silent)}"] if silent else [])
            + [f"{host} is not a worker of namespace {namespace!r}: {elsewhere[host]}"
               for host in missing if host in elsewhere])
    fail(obj, as_json, EXIT_UNAVAILABLE, "no_answer", message)

