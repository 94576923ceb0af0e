"""What every ``celery forseti`` subcommand shares: the exit codes, the ``--json``/``--timeout``
options, table and JSON output, and the mapping of forseti's errors (and a dead broker) to exit codes."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import click
from celery.bin.base import CeleryOption
from celery.exceptions import CeleryCommandException
from kombu.exceptions import OperationalError

from ..app import Forseti
from ..core.errors import (
    BrokerUnavailable,
    ForsetiError,
    ForsetiTimeout,
    InvalidArgument,
    ProcessGone,
    UnknownName,
)

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


def options(default_timeout: float | None, timeout_help: str) -> Callable[[F], F]:
    """``--json`` and ``--timeout``, shared by every subcommand."""
    def decorate(f: F) -> F:
        f = click.option("-j", "--json", "as_json", cls=CeleryOption, is_flag=True, help_group="Output Options",
                         help="Print JSON (errors too) instead of a table.")(f)
        f = click.option("-t", "--timeout", cls=CeleryOption, type=click.FloatRange(0, min_open=True),
                         default=default_timeout, show_default=default_timeout is not None,
                         help_group="Remote Control Options", help=timeout_help)(f)
        return f
    return decorate


def name_option(help: str) -> Callable[[F], F]:
    return click.option("--name", cls=CeleryOption, default="default", show_default=True,
                        help_group="Keyed Process Options", help=help)


# -- output ------------------------------------------------------------------------------------
def print_json(obj: Any, value: Any) -> None:
    obj.echo(json.dumps(value, sort_keys=True))


def table(obj: Any, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    obj.echo(obj.style(line, bold=True))
    for r in cells:
        obj.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def fail(obj: Any, as_json: bool, code: int, kind: str, message: str) -> NoReturn:
    """Exit with ``code``; with ``--json`` the error is also printed on stdout as an object."""
    if as_json:
        print_json(obj, {"error": kind, "message": message})
    raise CeleryCommandException(message=message, exit_code=code)


def broker_uri(obj: Any) -> str:
    """The app's broker URL, password masked (as the client's errors show it)."""
    return str(obj.app.connection_for_write().as_uri())


def unreachable(obj: Any, as_json: bool, exc: BaseException) -> NoReturn:
    reason = str(exc) or repr(exc)
    fail(obj, as_json, EXIT_UNAVAILABLE, "broker_unreachable", f"broker unreachable: {broker_uri(obj)}: {reason}")


@contextmanager
def exit_on_errors(obj: Any, as_json: bool) -> Iterator[None]:
    """Turn forseti's errors into the documented exit codes, in one format."""
    try:
        yield
    except (UnknownName, ProcessGone) as exc:
        fail(obj, as_json, EXIT_NOT_FOUND, "not_found", str(exc))
    except InvalidArgument as exc:
        fail(obj, as_json, EXIT_USAGE, "usage", str(exc))
    except ForsetiTimeout as exc:
        fail(obj, as_json, EXIT_UNAVAILABLE, "no_answer", str(exc))
    except BrokerUnavailable as exc:
        unreachable(obj, as_json, exc.__cause__ or exc)
    except ForsetiError as exc:
        fail(obj, as_json, EXIT_ERROR, type(exc).__name__, str(exc))
    except Exception as exc:
        conn = obj.app.connection_for_write()  # not connected: only asked for its transport's errors
        if not isinstance(exc, (OperationalError, *conn.connection_errors, *conn.channel_errors)):
            raise
        unreachable(obj, as_json, exc)


def connect(obj: Any) -> Any:
    """A connection to the app's broker, connected with a bounded retry (raises at once when it is down).

    Celery's control commands would connect following ``broker_connection_*``: seconds on a dead broker.
    """
    conn = obj.app.connection_for_write()
    conn.ensure_connection(max_retries=1, interval_start=0.1, interval_step=0.2, interval_max=0.2, timeout=2.0)
    return conn


class JsonParam(click.ParamType[Any]):
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
def forseti_client(obj: Any, as_json: bool) -> Iterator[Forseti]:
    """The app's :class:`Forseti`; its client is closed on the way out."""
    with exit_on_errors(obj, as_json):
        forseti = Forseti.of(obj.app)
        try:
            yield forseti
        finally:
            forseti.close()


def stats_of(app: Any, hosts: set[str], timeout: float) -> dict[str, Any]:
    """``celery inspect stats`` of ``hosts``, returning as soon as all have answered."""
    if not hosts:
        return {}
    stats = app.control.inspect(destination=sorted(hosts), timeout=timeout, limit=len(hosts)).stats()
    return {host: s for host, s in (stats or {}).items() if isinstance(s, dict)}


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def yes(flag: Any) -> str:
    return "yes" if flag else "no"


def by_name(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}={n}" for name, n in sorted(counts.items())) or "-"

