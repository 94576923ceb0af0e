"""``celery inspect stats`` and the forseti_keys / forseti_stop commands, on two real workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from forseti_celery.control import forseti_keys, forseti_stop, step_of
from forseti_celery.testing import wait_for

from .helpers import ROOT, Harness, alive, fresh, harness


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    url = request.getfixturevalue(f"{request.param}_url")
    with harness(url, tmp_path_factory.mktemp(request.param), n=2) as h:
        yield h


def hostnames(h: Harness) -> list[str]:
    return [w.hostname for w in h.cluster.workers]


def ask(h: Harness, command: str, destination: list[str] | None = None, **arguments: Any) -> dict[str, Any]:
    """Every reply of ``h``'s workers to ``command`` (others on the broker are not asked)."""
    destination = destination or hostnames(h)
    replies = h.app.control.broadcast(command, arguments=arguments, destination=destination, reply=True,
                                      timeout=10, limit=len(destination))
    merged = {host: body for reply in replies for host, body in reply.items()}
    assert set(merged) == set(destination), f"{command}: no answer from {set(destination) - set(merged)}"
    return merged


def test_inspect_stats_has_a_forseti_section_with_exactly_one_leader(h: Harness) -> None:
    stats = h.app.control.inspect(destination=hostnames(h), timeout=10, limit=2).stats()
    assert set(stats) == set(hostnames(h))
    sections = {host: s["forseti"] for host, s in stats.items()}
    assert sorted(s["leader"] for s in sections.values()) == [False, True]
    for s in sections.values():
        assert s["eligible"] is True
        assert set(s["members"]) == set(hostnames(h))
        assert {"processes", "total", "starts", "exits", "epoch"} <= set(s)
    (leader,) = [s for s in sections.values() if s["leader"]]
    assert leader["table"]["ready"] is True


def test_inspect_stats_counts_the_processes_of_each_worker_by_name(h: Harness) -> None:
    refs = [h.forseti.get_key(fresh("stats")) for _ in range(2)] + [h.forseti.get_key(fresh("stats"), name="poller")]
    stats = h.app.control.inspect(destination=hostnames(h), timeout=10, limit=2).stats()
    for host, s in stats.items():
        mine = [r for r in refs if r.node == host]
        assert s["forseti"]["total"] == len(mine)
        assert s["forseti"]["processes"] == {n: sum(r.name == n for r in mine) for n in {r.name for r in mine}}
    for r in refs:
        r.stop()


def test_forseti_keys_lists_what_was_created_with_its_pids_and_messages(h: Harness) -> None:
    counter, poller = h.forseti.get_key(fresh("listed")), h.forseti.get_key(fresh("listed"), name="poller")
    for _ in range(3):
        counter.call("get")
    replies = ask(h, "forseti_keys")
    listed = {(host, k["name"], k["key"]): k for host, body in replies.items() for k in body["keys"]}
    assert all(body["namespace"] == h.namespace for body in replies.values())
    assert set(listed) == {(counter.node, "default", counter.key), (poller.node, "poller", poller.key)}
    c = listed[(counter.node, "default", counter.key)]
    assert c["pid"] == counter.pid and c["started"] is True and c["messages"] == 3 and 0 <= c["uptime"] < 60
    assert listed[(poller.node, "poller", poller.key)]["pid"] == poller.pid
    only_pollers = ask(h, "forseti_keys", name="poller")
    assert [(k["key"], k["pid"]) for body in only_pollers.values() for k in body["keys"]] == [(poller.key, poller.pid)]
    counter.stop()
    poller.stop()


def test_forseti_stop_frees_a_key_of_the_worker_that_runs_it(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("ctl-stop"), name="poller")
    reply = ask(h, "forseti_stop", [ref.node], key=ref.key, name="poller")[ref.node]
    assert reply == {"ok": {"node": ref.node, "key": ref.key, "name": "poller", "pid": ref.pid}}
    wait_for(lambda: h.forseti.search_key(ref.key, name="poller") is None, 10, message=f"{ref} still registered")
    wait_for(lambda: not alive(ref.pid), 5, message=f"pid {ref.pid} still runs")
    assert not any(k["key"] == ref.key for body in ask(h, "forseti_keys").values() for k in body["keys"])
    again = h.forseti.get_key(ref.key, name="poller")
    assert again.pid != ref.pid
    again.stop()


def test_forseti_stop_answers_not_found_for_a_key_the_worker_does_not_run(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("elsewhere"))
    other = next(host for host in hostnames(h) if host != ref.node)
    replies = ask(h, "forseti_stop", key=ref.key)
    assert "ok" in replies[ref.node]
    assert replies[other]["error"].startswith("not found:")
    assert "not found" in ask(h, "forseti_stop", [ref.node], key=fresh("never-created"))[ref.node]["error"]
    wait_for(lambda: h.forseti.search_key(ref.key) is None, 10, message=f"{ref} still registered")


def test_the_celery_command_line_sends_both_commands_with_their_positional_arguments(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("celery-cli"), name="poller")

    def celery(*args: str) -> Any:
        env = {**os.environ, "FORSETI_BROKER_URL": h.cluster.broker_url, "FORSETI_NAMESPACE": h.namespace}
        done = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.app", *args, "-d", ref.node, "-t", "10",
                               "--json"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
        return json.loads(done.stdout.splitlines()[0])

    listed = celery("inspect", "forseti_keys", "poller")
    assert [(k["key"], k["pid"]) for k in listed[ref.node]["keys"]] == [(ref.key, ref.pid)]
    (reply,) = celery("control", "forseti_stop", ref.key, "poller")
    assert reply[ref.node]["ok"]["pid"] == ref.pid
    wait_for(lambda: h.forseti.search_key(ref.key, name="poller") is None, 10, message=f"{ref} still registered")


def test_forseti_stop_without_a_key_answers_a_usage_error_from_every_worker(h: Harness) -> None:
    for host, reply in ask(h, "forseti_stop").items():
        assert reply == {"error": "usage: forseti_stop <key> [name]: a key (text) is required, got None"}, host
    env = {**os.environ, "FORSETI_BROKER_URL": h.cluster.broker_url, "FORSETI_NAMESPACE": h.namespace}
    node = hostnames(h)[0]
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.app", "control", "forseti_stop", "-d", node,
                           "-t", "10"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert "a key (text) is required" in done.stdout + done.stderr and "TypeError" not in done.stdout + done.stderr


def test_commands_on_a_worker_without_forseti_answer_an_error() -> None:
    state = SimpleNamespace(consumer=SimpleNamespace(controller=SimpleNamespace(blueprint=SimpleNamespace(steps={}))))
    assert step_of(state) is None
    assert forseti_keys(state) == {"error": "forseti is not running on this worker"}
    assert forseti_stop(state, "k") == {"error": "forseti is not running on this worker"}
