"""What a caller gets wrong, or a keyed process raises, is answered with the documented error.

Bad timeouts, keys and refs are refused at the caller before anything is sent, on a warm client
too; a ``BaseException`` in ``handle_call`` is a crash (``RemoteError``) like any exception.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from celery import Celery

from forseti_celery import Forseti, InvalidArgument, InvalidKey, InvalidMessage, KeyRef, ProcessGone, RemoteError
from forseti_celery.core.conf import MAX_TIMEOUT

from .helpers import client_app, fresh, harness

BAD_TIMEOUTS = [math.inf, 1e10, MAX_TIMEOUT * 2, math.nan, -1, 0, "5", True]


@pytest.fixture
def warm(redis_url: str) -> Forseti:
    """A client whose cache holds a live ref of ``"k"`` (no worker needed: a hit sends nothing)."""
    forseti = Forseti.of(client_app(redis_url, fresh("forseti-warm")))
    forseti.client._cache.subscribed(True)
    forseti.client._cache.put(KeyRef("w@h", 1, "k", "default", forseti.settings.namespace, forseti.app))
    assert forseti.get_key("k") == KeyRef("w@h", 1, "k", "default", forseti.settings.namespace)
    return forseti


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS)
def test_every_public_function_refuses_a_timeout_that_is_not_a_positive_finite_number(
        warm: Forseti, timeout: object) -> None:
    ref = warm.get_key("k")
    for use in (lambda: ref.call("get", timeout=timeout), lambda: ref.stop(timeout=timeout),
                lambda: warm.get_key("k", timeout=timeout), lambda: warm.get_key("other", timeout=timeout),
                lambda: warm.search_key("k", timeout=timeout), lambda: warm.get_metrics(timeout=timeout),
                lambda: warm.get_less_used_node(timeout=timeout),
                lambda: warm.call("k", "get", timeout=timeout), lambda: warm.send("k", "inc", timeout=timeout)):
        with pytest.raises(InvalidArgument, match="timeout"):
            use()


def test_a_warm_get_key_checks_its_arguments_as_a_cold_one_does(warm: Forseti) -> None:
    with pytest.raises(InvalidKey):
        warm.get_key(["a"])  # type: ignore[arg-type]
    with pytest.raises(InvalidKey):
        warm.get_key("k" * (warm.settings.max_key_length + 1))
    with pytest.raises(InvalidMessage):
        warm.get_key("k", ({1},))
    with pytest.raises(InvalidArgument, match="name"):
        warm.get_key("k", name=["default"])  # type: ignore[arg-type]
    assert warm.get_key("k", [1, "a"]).pid == 1  # good arguments still hit the cache


def test_a_ref_of_another_namespace_is_refused_instead_of_served_by_this_cluster(warm: Forseti) -> None:
    theirs = KeyRef("w@h", 1, "k", "default", "no-such-namespace")
    for use in (lambda: theirs.call("get"), lambda: theirs.send("inc"), lambda: theirs.stop(),
                lambda: warm.client.call(theirs, "get", None), lambda: warm.client.cast(theirs, "inc")):
        with pytest.raises(InvalidArgument, match="no-such-namespace"):
            use()
    # Rebuilt for an app of another namespace: refused as well.
    with pytest.raises(InvalidArgument, match="no-such-namespace"):
        KeyRef.from_json(theirs.to_json(), warm.app).call("get")


def test_a_misconfigured_install_left_in_the_process_does_not_break_finding_another(warm: Forseti) -> None:
    bad_app = Celery("bad", set_as_current=False)
    bad_app.conf.forseti_nodes = "w1@host"  # refused when read: a list is wanted
    bad = Forseti(bad_app)  # kept alive: installed after ``warm``, so searched before it
    theirs = KeyRef("w@h", 1, "k", "default", "no-such-namespace")
    with pytest.raises(InvalidArgument, match="no-such-namespace"):
        theirs.call("get")
    assert Forseti.of(namespace=warm.settings.namespace) is warm
    assert bad.app is bad_app


@pytest.mark.parametrize(("data", "says"), [
    ({"node": "x"}, "'pid' missing, 'key' missing"),
    ({"node": "x", "pid": "12", "key": "k"}, "'pid' is str, not int"),
    ({"node": 1, "pid": 12, "key": "k", "ns": None}, "'node' is int, not str, 'ns' missing"),
    (["x", 12], "object, not list"),
])
def test_from_json_names_what_is_missing_or_wrong(data: object, says: str) -> None:
    with pytest.raises(InvalidArgument, match=says):
        KeyRef.from_json(data)  # type: ignore[arg-type]


def test_receive_refuses_a_timeout_the_wait_cannot_take() -> None:
    from forseti_celery import receive
    from forseti_celery.core import process

    class Box:
        def receive(self, timeout: float | None) -> None:
            return None
    process._mailbox = Box()
    try:
        assert receive(0) is None and receive(None) is None
        for timeout in (math.inf, 1e10, -1, math.nan):
            with pytest.raises(InvalidArgument, match="timeout"):
                receive(timeout)
    finally:
        process._mailbox = None


@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "GeneratorExit"])
def test_a_base_exception_in_handle_call_is_a_crash_reported_as_remote_error(
        broker_url: str, tmp_path: Path, exc: str) -> None:
    with harness(broker_url, tmp_path, n=1) as h:
        key = fresh("base-exc")
        ref = h.forseti.get_key(key)
        with pytest.raises(RemoteError) as info:
            ref.call({"raise": exc}, timeout=10)
        assert info.value.exc_type == exc
        fresh_ref = h.forseti.get_key(key, timeout=10)  # its key was freed: a new process serves it
        assert fresh_ref.pid != ref.pid and fresh_ref.call("get") == 0


def test_system_exit_in_handle_call_ends_the_process_normally_and_the_caller_learns_it_is_gone(
        broker_url: str, tmp_path: Path) -> None:
    with harness(broker_url, tmp_path, n=1) as h:
        ref = h.forseti.get_key(fresh("sys-exit"))
        with pytest.raises(ProcessGone, match="exited: normal"):
            ref.call({"raise": "SystemExit"}, timeout=10)
        other = h.forseti.get_key(fresh("sys-exit"))
        with pytest.raises(ProcessGone, match="exited: exit 7"):
            other.call({"raise": "SystemExit", "args": [7]}, timeout=10)
        assert h.forseti.search_key(ref.key) is None and h.forseti.search_key(other.key) is None


def test_an_app_without_forseti_namespace_match_is_named(redis_url: str) -> None:
    app = Celery("plain", broker=redis_url, set_as_current=False)
    Forseti(app, namespace="ns-a")
    with pytest.raises(InvalidArgument, match="'ns-b'"):
        Forseti.of(app, namespace="ns-b")
