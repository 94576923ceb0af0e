"""``celery forseti get|search|call|send|stop KEY``: one keyed process, through the app's client."""

from __future__ import annotations

from typing import Any

import click
from celery.bin.base import CeleryCommand, CeleryOption

from ..app import Forseti
from ..core.keyref import KeyRef
from .support import EXIT_NOT_FOUND, JsonParam, fail, forseti_client, name_option, options, print_json, table

__all__ = ["call", "get", "search", "send", "stop"]


def live(obj: Any, as_json: bool, f: Forseti, key: str, name: str, timeout: float | None) -> KeyRef:
    """KEY's live process, through ``search_key`` (never started); exits 1 if there is none."""
    ref = f.search_key(key, name=name, timeout=timeout)
    if ref is None:
        fail(obj, as_json, EXIT_NOT_FOUND, "not_found", f"no live keyed process {key!r} ({name})")
    return ref


def show(obj: Any, as_json: bool, ref: KeyRef) -> None:
    if as_json:
        print_json(obj, ref.to_json())
    else:
        table(obj, ["NODE", "PID", "NAME", "KEY"], [[ref.node, ref.pid, ref.name, ref.key]])


LEADER_TIMEOUT = "Seconds to wait for the leader (default: forseti_timeout)."
MSG = JsonParam(example="'\"get\"', '{\"add\": 2}'")


@click.command(cls=CeleryCommand)
@click.argument("key")
@name_option("Keyed-process name.")
@click.option("-a", "--args", "args", cls=CeleryOption, type=JsonParam(array=True, example="'[1, \"x\"]'"),
              default="[]", help_group="Keyed Process Options",
              help="JSON array passed to init after the key if it starts.")
@options(None, LEADER_TIMEOUT)
@click.pass_obj
def get(obj: Any, key: str, name: str, args: list[Any], as_json: bool, timeout: float | None) -> None:
    """Get KEY's live process, started if there is none.

    A new process starts on the least-used worker, with --args after the key.
    Exits 1 if no worker knows the name, 4 if its init failed.
    """
    with forseti_client(obj, as_json) as f:
        ref = f.get_key(key, args, name=name, timeout=timeout)
    show(obj, as_json, ref)


@click.command(cls=CeleryCommand)
@click.argument("key")
@name_option("Keyed-process name.")
@options(None, LEADER_TIMEOUT)
@click.pass_obj
def search(obj: Any, key: str, name: str, as_json: bool, timeout: float | None) -> None:
    """Show KEY's live process; never starts one.

    Exits 1 if KEY has no live process.
    """
    with forseti_client(obj, as_json) as f:
        ref = live(obj, as_json, f, key, name, timeout)
    show(obj, as_json, ref)


@click.command(cls=CeleryCommand)
@click.argument("key")
@click.argument("msg", type=MSG)
@name_option("Keyed-process name.")
@options(None, "Seconds to wait for the leader and for the answer (default: forseti_timeout, forseti_call_timeout).")
@click.pass_obj
def call(obj: Any, key: str, msg: Any, name: str, as_json: bool, timeout: float | None) -> None:
    """Send MSG (JSON) to KEY's handle_call and print the answer as JSON.

    Never starts a process: exits 1 if KEY has none, 4 if handle_call raised.
    """
    with forseti_client(obj, as_json) as f:
        ref = live(obj, as_json, f, key, name, timeout)
        answer = ref.call(msg, timeout)
    print_json(obj, {"answer": answer, **ref.to_json()} if as_json else answer)


@click.command(cls=CeleryCommand)
@click.argument("key")
@click.argument("msg", type=MSG)
@name_option("Keyed-process name.")
@options(None, LEADER_TIMEOUT)
@click.pass_obj
def send(obj: Any, key: str, msg: Any, name: str, as_json: bool, timeout: float | None) -> None:
    """Send MSG (JSON) to KEY's handle_cast without waiting.

    A function-form process gets it from receive(). Never starts a process: exits 1 if KEY has none.
    """
    with forseti_client(obj, as_json) as f:
        ref = live(obj, as_json, f, key, name, timeout)
        ref.send(msg)
    if as_json:
        print_json(obj, {"sent": True, **ref.to_json()})
    else:
        obj.echo(f"sent to {key!r} ({name}): pid {ref.pid} on {ref.node}")


@click.command(cls=CeleryCommand)
@click.argument("key")
@name_option("Keyed-process name.")
@options(None, "Seconds to wait for the leader and for the exit (default: forseti_timeout, forseti_call_timeout).")
@click.pass_obj
def stop(obj: Any, key: str, name: str, as_json: bool, timeout: float | None) -> None:
    """Stop KEY's process; returns once its key is free.

    Its terminate() runs; the command waits until it has exited. Exits 1 if KEY has no live process.
    """
    with forseti_client(obj, as_json) as f:
        ref = live(obj, as_json, f, key, name, timeout)
        ref.stop(timeout)
    if as_json:
        print_json(obj, {"stopped": True, **ref.to_json()})
    else:
        obj.echo(f"stopped {key!r} ({name}): pid {ref.pid} on {ref.node}")
