"""``celery -A tests.app forseti ...`` as a user runs it: a subprocess against two real workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection

from forseti_celery.cli import EXIT_ERROR, EXIT_NOT_FOUND, EXIT_UNAVAILABLE, EXIT_USAGE
from forseti_celery.testing import wait_for

from .helpers import ROOT, Harness, fresh, harness


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    url = request.getfixturevalue(f"{request.param}_url")
    with harness(url, tmp_path_factory.mktemp(request.param), n=2) as h:
        yield h


def forseti(broker_url: str, namespace: str, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    """Run ``celery -A tests.app forseti ARGS`` on ``namespace``; assert its exit code."""
    env = {**os.environ, "FORSETI_BROKER_URL": broker_url, "FORSETI_NAMESPACE": namespace}
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.app", "forseti", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == expect, f"exit {done.returncode} != {expect}\n{done.stdout}\n{done.stderr}"
    return done


def cli(h: Harness, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    return forseti(h.cluster.broker_url, h.namespace, *args, expect=expect)


def cli_json(h: Harness, *args: str, expect: int = 0) -> Any:
    return json.loads(cli(h, *args, "--json", expect=expect).stdout)


def rows(table: str) -> list[list[str]]:
    """The rows of a table printed by the CLI (header first), split on runs of two spaces."""
    return [[cell.strip() for cell in line.split("  ") if cell.strip()] for line in table.splitlines() if line.strip()]


def hostnames(h: Harness) -> str:
    return ",".join(w.hostname for w in h.cluster.workers)


def test_status_shows_the_leader_and_the_processes_of_each_worker(h: Harness) -> None:
    refs = [h.forseti.get_key(fresh("status")) for _ in range(3)]
    hosts = sorted(w.hostname for w in h.cluster.workers)
    status = cli_json(h, "status", "--timeout", "5")
    assert status["namespace"] == h.namespace and sorted(status["workers"]) == hosts
    assert status["leader"] in hosts and status["workers"][status["leader"]]["leader"] is True
    assert status["total"] == 3 and status["processes"] == {"default": 3}
    assert status["metrics"] == {host: sum(r.node == host for r in refs) for host in hosts}

    text = cli(h, "status", "--timeout", "5").stdout
    assert f"leader {status['leader']}" in text.splitlines()[0]
    table = rows(text)
    header = table.index(["NODE", "LEADER", "ELIGIBLE", "PROCESSES", "STARTS", "EXITS", "BY NAME"])
    for line in table[header + 1 : header + 3]:
        count = sum(r.node == line[0] for r in refs)
        assert line[0] in hosts and str(count) in line and (line[1] == "*") == (line[0] == status["leader"])
    assert "2 workers, 3 keyed processes (default=3)" in text
    for r in refs:
        r.stop()


def test_keys_lists_every_process_with_node_and_pid_and_filters_by_node_and_name(h: Harness) -> None:
    counter, poller = h.forseti.get_key(fresh("keys")), h.forseti.get_key(fresh("keys"), name="poller")
    listed = cli_json(h, "keys", "--timeout", "2")  # every worker on the broker is asked
    assert {(k["node"], k["name"], k["key"], k["pid"]) for k in listed} == {
        (counter.node, "default", counter.key, counter.pid), (poller.node, "poller", poller.key, poller.pid)}
    assert all(k["started"] and k["uptime"] >= 0 and k["messages"] == 0 for k in listed)

    on_node = cli_json(h, "keys", "--node", counter.node, "--timeout", "10")
    assert {k["node"] for k in on_node} == {counter.node} and counter.key in {k["key"] for k in on_node}

    table = rows(cli(h, "keys", "--node", hostnames(h), "--name", "default", "--timeout", "10").stdout)
    assert table == [["NODE", "NAME", "KEY", "PID", "UPTIME", "MESSAGES", "RESTARTS"],
                     [counter.node, "default", counter.key, str(counter.pid), table[1][4], "0", "0"],
                     ["1 keyed process on 2 workers"]]
    assert table[1][4].endswith(("seconds", "minutes"))
    counter.stop()
    poller.stop()


def test_keys_names_the_node_that_did_not_answer_and_not_the_one_that_did(h: Harness) -> None:
    live, ghost = h.cluster.workers[0].hostname, f"ghost-{time.monotonic_ns()}@nowhere"
    failed = cli(h, "keys", "--node", f"{live},{ghost}", "--timeout", "1", "--json", expect=EXIT_UNAVAILABLE)
    error = json.loads(failed.stdout)
    assert error["error"] == "no_answer"
    assert error["message"] == f"no answer within 1 s from {ghost}" and error["message"] in failed.stderr


def test_get_starts_a_key_once_and_passes_json_args(h: Harness) -> None:
    key = fresh("get")
    got = cli_json(h, "get", key, "--args", "[41]")
    ref = h.forseti.search_key(key)
    assert ref is not None and got == ref.to_json() and got["node"] == ref.node and got["pid"] == ref.pid
    assert ref.call("get") == 41
    assert rows(cli(h, "get", key).stdout) == [["NODE", "PID", "NAME", "KEY"], [ref.node, str(ref.pid), "default", key]]
    ref.stop()


def test_stop_frees_the_key_and_a_missing_key_exits_1(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("cli-stop"), name="poller")
    assert cli_json(h, "stop", ref.key, "--name", "poller") == {"stopped": True, **ref.to_json()}
    assert h.forseti.search_key(ref.key, name="poller") is None
    missing = cli(h, "stop", ref.key, "--name", "poller", "--json", expect=EXIT_NOT_FOUND)
    assert json.loads(missing.stdout)["error"] == "not_found" and "no live keyed process" in missing.stderr


def test_search_shows_a_live_key_and_never_starts_one(h: Harness) -> None:
    key = fresh("search")
    missing = cli(h, "search", key, "--json", expect=EXIT_NOT_FOUND)
    assert json.loads(missing.stdout) == {"error": "not_found", "message": f"no live keyed process {key!r} (default)"}
    assert h.forseti.search_key(key) is None
    ref = h.forseti.get_key(key)
    assert cli_json(h, "search", key) == ref.to_json()
    table = rows(cli(h, "search", key).stdout)
    assert table == [["NODE", "PID", "NAME", "KEY"], [ref.node, str(ref.pid), "default", key]]
    ref.stop()


def test_call_prints_the_answer_and_send_delivers_a_cast_to_a_live_key(h: Harness) -> None:
    ref = h.forseti.get_key(fresh("call"), [41])
    assert json.loads(cli(h, "call", ref.key, '"get"').stdout) == 41
    assert cli_json(h, "call", ref.key, '{"x": [1, "y"]}') == {"answer": ["echo", {"x": [1, "y"]}], **ref.to_json()}
    assert cli_json(h, "send", ref.key, '"inc"') == {"sent": True, **ref.to_json()}
    sent = cli(h, "send", ref.key, '["a", 1]').stdout.strip()
    assert sent == f"sent to {ref.key!r} (default): pid {ref.pid} on {ref.node}"
    wait_for(lambda: ref.call("seen") == ["inc", ["a", 1]], 10, message="the casts never arrived")
    assert ref.call("get") == 42
    crashed = cli(h, "call", ref.key, '"crash"', "--json", expect=EXIT_ERROR)
    assert json.loads(crashed.stdout)["error"] == "RemoteError" and "asked to crash" in crashed.stderr


def test_call_and_send_never_start_a_process_and_refuse_a_msg_that_is_not_json(h: Harness) -> None:
    key = fresh("call-missing")
    for command in ("call", "send"):
        missing = cli(h, command, key, '"get"', "--json", expect=EXIT_NOT_FOUND)
        assert json.loads(missing.stdout)["error"] == "not_found" and f"no live keyed process {key!r}" in missing.stderr
        bad = cli(h, command, key, "get", expect=EXIT_USAGE).stderr
        assert "Invalid value for 'MSG': 'get' is not JSON" in bad and """e.g. '"get"'""" in bad
    assert h.forseti.search_key(key) is None


def test_a_name_no_worker_knows_exits_1(h: Harness) -> None:
    assert cli_json(h, "get", "k", "--name", "nobody-knows-me", expect=EXIT_NOT_FOUND)["error"] == "not_found"


# -- without a cluster of its own ---------------------------------------------------------------

def test_bad_arguments_exit_2_naming_the_argument_and_what_is_wrong(redis_url: str) -> None:
    not_json = forseti(redis_url, "forseti-unused", "get", "k", "--args", "notjson", expect=EXIT_USAGE).stderr
    assert "'--args': 'notjson' is not JSON (Expecting value" in not_json and "e.g. '[1, \"x\"]'" in not_json
    assert "'--args': '{}' is not a JSON array" in forseti(redis_url, "forseti-unused", "get", "k", "--args", "{}",
                                                            expect=EXIT_USAGE).stderr
    forseti(redis_url, "forseti-unused", "keys", "--timeout", "0", expect=EXIT_USAGE)


def test_a_namespace_nobody_serves_exits_3_naming_the_namespace_and_the_broker(redis_url: str) -> None:
    unused = f"forseti-nobody-{time.monotonic_ns()}"
    where = f"namespace {unused!r} on {Connection(redis_url).as_uri()}"
    for args in (["status"], ["get", "k"], ["search", "k"], ["call", "k", "1"], ["send", "k", "1"], ["stop", "k"]):
        done = forseti(redis_url, unused, *args, "--timeout", "0.3", "--json", expect=EXIT_UNAVAILABLE)
        error = json.loads(done.stdout)
        assert error["error"] == "no_answer" and error["message"].startswith("no leader answered"), (args, error)
        assert where in error["message"] and done.stderr.rstrip().endswith(f"Error: {error['message']}"), args
    nobody = forseti(redis_url, unused, "keys", "--timeout", "0.3", "--json", expect=EXIT_UNAVAILABLE)
    assert json.loads(nobody.stdout) == {"error": "no_answer", "message": f"no worker of {where} answered within 0.3 s"}
    missing = forseti(redis_url, unused, "keys", "--node", "nobody@nowhere", "--timeout", "0.3",
                      expect=EXIT_UNAVAILABLE)
    assert "no answer within 0.3 s from nobody@nowhere" in missing.stderr


DEAD_BROKERS = {"redis": "redis://127.0.0.1:1/0", "rabbitmq": "amqp://guest:guest@127.0.0.1:1//"}
SUBCOMMANDS = [["status"], ["keys"], ["keys", "--node", "w1@nowhere"], ["get", "k"], ["search", "k"],
               ["call", "k", '"get"'], ["send", "k", '"inc"'], ["stop", "k"]]


@pytest.mark.parametrize("transport", sorted(DEAD_BROKERS))
def test_every_subcommand_reports_a_dead_broker_in_one_format_with_exit_3(transport: str) -> None:
    url = DEAD_BROKERS[transport]
    shown = Connection(url).as_uri()  # the password masked
    figures = []
    for args in SUBCOMMANDS:
        t0 = time.monotonic()
        done = forseti(url, "forseti-dead", *args, "--json", expect=EXIT_UNAVAILABLE)
        figures.append(f"{' '.join(args)} {time.monotonic() - t0:.2f} s")
        error = json.loads(done.stdout)
        assert error["error"] == "broker_unreachable", (args, error)
        assert error["message"].startswith(f"broker unreachable: {shown}: ") and "refused" in error["message"]
        assert done.stderr.rstrip().endswith(f"Error: {error['message']}"), (args, done.stderr)
    print(f"\ndead {transport} broker, wall time per subcommand: {', '.join(figures)}")
