"""``celery forseti``: the cluster's keyed processes from the shell.

A Celery CLI plugin (entry point ``celery.commands``), so it runs with the app
given to ``celery -A``::

    celery -A proj forseti status                  # leader, processes per worker, totals
    celery -A proj forseti keys [--node N] [--name NAME]
    celery -A proj forseti get KEY [--name NAME] [--args '[1, "x"]']   # started if absent
    celery -A proj forseti search KEY [--name NAME]                  # never starts one
    celery -A proj forseti call KEY MSG [--name NAME]                # MSG and the answer in JSON
    celery -A proj forseti send KEY MSG [--name NAME]
    celery -A proj forseti stop KEY [--name NAME]

Every subcommand takes ``--json`` and ``--timeout``. Exit codes, for scripts:
0 ok; 1 not found (no such key, unknown name); 2 usage; 3 no answer in time
(no leader, no worker, broker unreachable); 4 any other :class:`ForsetiError`.
Every error is one ``Error: TEXT`` line on stderr (and ``{"error": KIND,
"message": TEXT}`` on stdout with ``--json``); a dead broker fails every
subcommand after one short retry.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import click
from celery.bin.base import COMMA_SEPARATED_LIST, CeleryCommand, CeleryOption
from celery.exceptions import CeleryCommandException
from celery.utils.time import humanize_seconds
from kombu.exceptions import OperationalError

from .app import Forseti
from .core.errors import (
    BrokerUnavailable,
    ForsetiError,
    ForsetiTimeout,
    InvalidArgument,
    ProcessGone,
    UnknownName,
)
from .core.keyref import KeyRef

__all__ = ["EXIT_ERROR", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_UNAVAILABLE", "EXIT_USAGE", "forseti"]

#: Success.
EXIT_OK = 0
#: No such key, unknown keyed-process name.
EXIT_NOT_FOUND = 1
#: Bad command line (click's own code).
EXIT_USAGE = 2
#: No answer in time: no leader, no worker of the namespace, broker unreachable.
EXIT_UNAVAILABLE = 3
#: Any other :class:`~forseti_celery.ForsetiError` (a failed ``init``, a bad configuration, …).
EXIT_ERROR = 4

F = TypeVar("F", bound=Callable[..., Any])


def _options(default_timeout: float | None, timeout_help: str) -> Callable[[F], F]:
    """``--json`` and ``--timeout``, shared by every subcommand."""
    def decorate(f: F) -> F:
        f = click.option("-j", "--json", "as_json", cls=CeleryOption, is_flag=True, help_group="Output Options",
                         help="Print JSON (errors too) instead of a table.")(f)
        f = click.option("-t", "--timeout", cls=CeleryOption, type=click.FloatRange(0, min_open=True),
                         default=default_timeout, show_default=default_timeout is not None,
                         help_group="Remote Control Options", help=timeout_help)(f)
        return f
    return decorate


def _name_option(help: str) -> Callable[[F], F]:
    return click.option("--name", cls=CeleryOption, default="default", show_default=True,
                        help_group="Keyed Process Options", help=help)


# -- output ------------------------------------------------------------------------------------
def _print_json(obj: Any, value: Any) -> None:
    obj.echo(json.dumps(value, sort_keys=True))


def _table(obj: Any, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    obj.echo(obj.style(line, bold=True))
    for r in cells:
        obj.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _fail(obj: Any, as_json: bool, code: int, kind: str, message: str) -> NoReturn:
    """Exit with ``code``; with ``--json`` the error is also printed on stdout as an object."""
    if as_json:
        _print_json(obj, {"error": kind, "message": message})
    raise CeleryCommandException(message=message, exit_code=code)


def _broker(obj: Any) -> str:
    """The app's broker URL, password masked (as the client's errors show it)."""
    return str(obj.app.connection_for_write().as_uri())


def _unreachable(obj: Any, as_json: bool, exc: BaseException) -> NoReturn:
    reason = str(exc) or repr(exc)
    _fail(obj, as_json, EXIT_UNAVAILABLE, "broker_unreachable", f"broker unreachable: {_broker(obj)}: {reason}")


@contextmanager
def _errors(obj: Any, as_json: bool) -> Iterator[None]:
    """Turn forseti's errors into the documented exit codes, in one format."""
    try:
        yield
    except (UnknownName, ProcessGone) as exc:
        _fail(obj, as_json, EXIT_NOT_FOUND, "not_found", str(exc))
    except InvalidArgument as exc:
        _fail(obj, as_json, EXIT_USAGE, "usage", str(exc))
    except ForsetiTimeout as exc:
        _fail(obj, as_json, EXIT_UNAVAILABLE, "no_answer", str(exc))
    except BrokerUnavailable as exc:
        _unreachable(obj, as_json, exc.__cause__ or exc)
    except ForsetiError as exc:
        _fail(obj, as_json, EXIT_ERROR, type(exc).__name__, str(exc))
    except Exception as exc:
        conn = obj.app.connection_for_write()  # not connected: only asked for its transport's errors
        if not isinstance(exc, (OperationalError, *conn.connection_errors, *conn.channel_errors)):
            raise
        _unreachable(obj, as_json, exc)


def _connect(obj: Any) -> Any:
    """A connection to the app's broker, connected with a bounded retry (raises at once when it is down).

    Celery's control commands would connect following ``broker_connection_*``: seconds on a dead broker.
    """
    conn = obj.app.connection_for_write()
    conn.ensure_connection(max_retries=1, interval_start=0.1, interval_step=0.2, interval_max=0.2, timeout=2.0)
    return conn


class _Json(click.ParamType[Any]):
    """A JSON value on the command line (a JSON array if ``array``); a bad one is a usage error saying why."""

    name = "json"

    def __init__(self, array: bool = False, example: str = "'\"text\"', '[1, 2]'") -> None:
        self.array = array
        self.example = example

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            decoded = json.loads(value)
        except ValueError as exc:
            self.fail(f"{value!r} is not JSON ({exc}); write it as JSON, e.g. {self.example}", param, ctx)
        if self.array and not isinstance(decoded, list):
            self.fail(f"{value!r} is not a JSON array; e.g. {self.example}", param, ctx)
        return decoded


@contextmanager
def _forseti(obj: Any, as_json: bool) -> Iterator[Forseti]:
    """The app's :class:`Forseti`; its client is closed on the way out."""
    with _errors(obj, as_json):
        forseti = Forseti.of(obj.app)
        try:
            yield forseti
        finally:
            forseti.close()


def _stats(app: Any, hosts: set[str], timeout: float) -> dict[str, Any]:
    """``celery inspect stats`` of ``hosts``, returning as soon as all have answered."""
    if not hosts:
        return {}
    stats = app.control.inspect(destination=sorted(hosts), timeout=timeout, limit=len(hosts)).stats()
    return {host: s for host, s in (stats or {}).items() if isinstance(s, dict)}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def _yes(flag: Any) -> str:
    return "yes" if flag else "no"


def _by_name(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}={n}" for name, n in sorted(counts.items())) or "-"


# -- commands ----------------------------------------------------------------------------------
@click.group(name="forseti")
def forseti(**kwargs: Any) -> None:
    """Keyed processes of forseti_celery: status, keys, get, search, call, send, stop.

    Exit codes: 0 ok, 1 not found, 2 usage, 3 no answer in time (no leader, no
    worker, broker unreachable), 4 other forseti error.
    """


@forseti.command(cls=CeleryCommand)
@_options(1.0, "Seconds to wait for the leader and for the workers' stats.")
@click.pass_obj
def status(obj: Any, as_json: bool, timeout: float) -> None:
    """Show the leader, the keyed processes of every worker, and totals.

    Exits 3 when no leader of the app's namespace answers.
    """
    with _forseti(obj, as_json) as f:
        namespace = f.settings.namespace
        metrics = f.get_metrics(timeout=timeout)  # no leader: the client's timeout names namespace and broker
        # Ask only this namespace's workers (others may share the broker): the leader's eligible
        # workers first, then any other member they know of (non-eligible workers).
        stats = _stats(obj.app, set(metrics), timeout)
        hosts = set(metrics).union(*((s.get("forseti") or {}).get("members", ()) for s in stats.values()))
        if hosts - set(stats):
            stats.update(_stats(obj.app, hosts - set(stats), timeout))
    workers: dict[str, dict[str, Any] | None] = {h: (stats.get(h) or {}).get("forseti") for h in sorted(hosts)}
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
        _print_json(obj, summary)
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
            rows.append([host, "*" if s.get("leader") else "", _yes(s.get("eligible")), s.get("total", 0),
                         s.get("starts", 0), s.get("exits", 0), _by_name(s.get("processes", {}))])
    _table(obj, ["NODE", "LEADER", "ELIGIBLE", "PROCESSES", "STARTS", "EXITS", "BY NAME"], rows)
    obj.echo()
    obj.echo(f"{_count(len(workers), 'worker')}, {_count(total, 'keyed process')} "
             f"({_by_name(processes)})")


@forseti.command(cls=CeleryCommand)
@click.option("--node", "nodes", cls=CeleryOption, type=COMMA_SEPARATED_LIST, help_group="Keyed Process Options",
              help="Only these workers (comma-separated hostnames).")
@click.option("--name", cls=CeleryOption, help_group="Keyed Process Options",
              help="Only keyed processes of this name.")
@_options(1.0, "Seconds to wait for the workers' answers.")
@click.pass_obj
def keys(obj: Any, nodes: list[str] | None, name: str | None, as_json: bool, timeout: float) -> None:
    """List keyed processes: node, name, key, pid, uptime, messages.

    Asks every worker on the broker (or only the --node ones) and keeps those of
    the app's namespace. Exits 3 when no worker of the app's namespace (or not every --node) answers.
    """
    with _errors(obj, as_json):
        namespace = Forseti.of(obj.app).settings.namespace
        with _connect(obj) as conn:
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
            _print_json(obj, rows)
        else:
            _table(obj, ["NODE", "NAME", "KEY", "PID", "UPTIME", "MESSAGES"],
                   [[r["node"], r["name"], r["key"], r["pid"] if r["started"] else f"{r['pid']} (starting)",
                     humanize_seconds(r["uptime"], microseconds=True), r["messages"]] for r in rows])
            obj.echo(f"\n{_count(len(rows), 'keyed process')} on {_count(len(answered), 'worker')}")
        return
    if not missing:
        message = f"no worker of namespace {namespace!r} on {_broker(obj)} answered within {timeout:g} s"
    else:
        silent = [host for host in missing if host not in elsewhere]
        message = "; ".join(
            ([f"no answer within {timeout:g} s from {', '.join(silent)}"] if silent else [])
            + [f"{host} is not a worker of namespace {namespace!r}: {elsewhere[host]}"
               for host in missing if host in elsewhere])
    _fail(obj, as_json, EXIT_UNAVAILABLE, "no_answer", message)


def _live(obj: Any, as_json: bool, f: Forseti, key: str, name: str, timeout: float | None) -> KeyRef:
    """KEY's live process, through ``search_key`` (never started); exits 1 if there is none."""
    ref = f.search_key(key, name=name, timeout=timeout)
    if ref is None:
        _fail(obj, as_json, EXIT_NOT_FOUND, "not_found", f"no live keyed process {key!r} ({name})")
    return ref


def _show(obj: Any, as_json: bool, ref: KeyRef) -> None:
    if as_json:
        _print_json(obj, ref.to_json())
    else:
        _table(obj, ["NODE", "PID", "NAME", "KEY"], [[ref.node, ref.pid, ref.name, ref.key]])


_LEADER_TIMEOUT = "Seconds to wait for the leader (default: forseti_timeout)."
_MSG = _Json(example="'\"get\"', '{\"add\": 2}'")


@forseti.command(cls=CeleryCommand)
@click.argument("key")
@_name_option("Keyed-process name.")
@click.option("-a", "--args", "args", cls=CeleryOption, type=_Json(array=True, example="'[1, \"x\"]'"), default="[]",
              help_group="Keyed Process Options", help="JSON array passed to init after the key if it starts.")
@_options(None, _LEADER_TIMEOUT)
@click.pass_obj
def get(obj: Any, key: str, name: str, args: list[Any], as_json: bool, timeout: float | None) -> None:
    """Get KEY's live process, started if there is none.

    A new process starts on the least-used worker, with --args after the key.
    Exits 1 if no worker knows the name, 4 if its init failed.
    """
    with _forseti(obj, as_json) as f:
        ref = f.get_key(key, args, name=name, timeout=timeout)
    _show(obj, as_json, ref)


@forseti.command(cls=CeleryCommand)
@click.argument("key")
@_name_option("Keyed-process name.")
@_options(None, _LEADER_TIMEOUT)
@click.pass_obj
def search(obj: Any, key: str, name: str, as_json: bool, timeout: float | None) -> None:
    """Show KEY's live process; never starts one.

    Exits 1 if KEY has no live process.
    """
    with _forseti(obj, as_json) as f:
        ref = _live(obj, as_json, f, key, name, timeout)
    _show(obj, as_json, ref)


@forseti.command(cls=CeleryCommand)
@click.argument("key")
@click.argument("msg", type=_MSG)
@_name_option("Keyed-process name.")
@_options(None, "Seconds to wait for the leader and for the answer (default: forseti_timeout, forseti_call_timeout).")
@click.pass_obj
def call(obj: Any, key: str, msg: Any, name: str, as_json: bool, timeout: float | None) -> None:
    """Send MSG (JSON) to KEY's handle_call and print the answer as JSON.

    Never starts a process: exits 1 if KEY has none, 4 if handle_call raised.
    """
    with _forseti(obj, as_json) as f:
        ref = _live(obj, as_json, f, key, name, timeout)
        answer = ref.call(msg, timeout)
    _print_json(obj, {"answer": answer, **ref.to_json()} if as_json else answer)


@forseti.command(cls=CeleryCommand)
@click.argument("key")
@click.argument("msg", type=_MSG)
@_name_option("Keyed-process name.")
@_options(None, _LEADER_TIMEOUT)
@click.pass_obj
def send(obj: Any, key: str, msg: Any, name: str, as_json: bool, timeout: float | None) -> None:
    """Send MSG (JSON) to KEY's handle_cast without waiting.

    A function-form process gets it from receive(). Never starts a process: exits 1 if KEY has none.
    """
    with _forseti(obj, as_json) as f:
        ref = _live(obj, as_json, f, key, name, timeout)
        ref.send(msg)
    if as_json:
        _print_json(obj, {"sent": True, **ref.to_json()})
    else:
        obj.echo(f"sent to {key!r} ({name}): pid {ref.pid} on {ref.node}")


@forseti.command(cls=CeleryCommand)
@click.argument("key")
@_name_option("Keyed-process name.")
@_options(None, "Seconds to wait for the leader and for the exit (default: forseti_timeout, forseti_call_timeout).")
@click.pass_obj
def stop(obj: Any, key: str, name: str, as_json: bool, timeout: float | None) -> None:
    """Stop KEY's process; returns once its key is free.

    Its terminate() runs; the command waits until it has exited. Exits 1 if KEY has no live process.
    """
    with _forseti(obj, as_json) as f:
        ref = _live(obj, as_json, f, key, name, timeout)
        ref.stop(timeout)
    if as_json:
        _print_json(obj, {"stopped": True, **ref.to_json()})
    else:
        obj.echo(f"stopped {key!r} ({name}): pid {ref.pid} on {ref.node}")
