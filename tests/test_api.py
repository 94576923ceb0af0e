"""The public surface: exports, settings, errors, refs and the wire codec (no broker needed)."""

from __future__ import annotations

import json

import pytest
from celery import Celery
from kombu.utils.json import dumps, loads

import forseti_celery
from forseti_celery import ConfigurationError, Forseti, ForsetiError, KeyRef
from forseti_celery.core import errors as errors_module
from forseti_celery.core.conf import Settings
from forseti_celery.core.protocol import decode, encode


def test_all_is_sorted_and_lists_every_public_name() -> None:
    assert forseti_celery.__all__ == sorted(forseti_celery.__all__)
    public = {n for n in dir(forseti_celery) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(forseti_celery, n)).__name__ == "module"}
    assert set(forseti_celery.__all__) == public - modules - {"annotations", "Any", "Celery", "Sequence"}


def test_every_error_derives_from_forseti_error_and_says_when_it_is_raised() -> None:
    for name in errors_module.__all__:
        cls = getattr(errors_module, name)
        assert issubclass(cls, ForsetiError)
        assert (cls.__doc__ and cls.__doc__.startswith("Raised")) or cls is ForsetiError


def test_settings_come_from_app_conf_and_explicit_arguments_win() -> None:
    app = Celery("conf", set_as_current=False)
    app.conf.update(forseti_max_retries=3, forseti_nodes=["a@x"], forseti_timeout=2.5)
    s = Settings.from_app(app.conf, max_retries=7)
    assert (s.max_retries, s.nodes, s.timeout, s.max_time) == (7, ("a@x",), 2.5, 10.0)
    assert Settings() == Settings.from_app(Celery("d", set_as_current=False).conf)


def test_bad_settings_are_refused_with_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="unknown forseti settings"):
        Forseti(Celery("bad", set_as_current=False), colour="blue")
    with pytest.raises(ConfigurationError, match="forseti_heartbeat"):
        Settings.from_app({}, heartbeat=-1)
    with pytest.raises(ConfigurationError, match="namespace"):
        Settings.from_app({}, namespace="a b")


def test_a_ref_unpacks_like_node_pid_and_round_trips_through_celery_json() -> None:
    ref = KeyRef("w1@host", 1234, "cart:42", "default")
    node, pid = ref
    assert (node, pid) == ("w1@host", 1234)
    back = loads(dumps({"ref": ref}))["ref"]
    assert isinstance(back, KeyRef) and back == ref and hash(back) == hash(ref)
    assert KeyRef("w1@host", 1234, "cart:42", "other") != ref
    with pytest.raises(AttributeError):
        ref.pid = 1  # type: ignore[misc]


def test_the_wire_is_a_json_object_a_line_and_refuses_what_json_cannot_carry() -> None:
    batch = [{"t": "cast", "n": "default", "k": "ключ.*#\n\t", "m": [1, "two"]}, {"t": "hb"}]
    assert decode(encode(batch)) == batch
    assert [json.loads(line) for line in encode(batch).split(b"\n")] == batch
    with pytest.raises(forseti_celery.InvalidMessage):
        encode([{"m": object()}])


def test_keyed_registers_classes_and_functions_by_name() -> None:
    forseti = Forseti(Celery("reg", set_as_current=False))

    @forseti.keyed
    class Room(forseti_celery.KeyedProcess):
        pass

    @forseti.keyed(name="poller")
    def poll(key: str) -> None:
        pass

    assert forseti.resolve("default") is Room and forseti.resolve("poller") is poll
    assert forseti.resolve("missing") is None and forseti.known_names() == {"default", "poller"}
    with pytest.raises(forseti_celery.InvalidArgument):
        forseti.keyed(name="")


def test_forseti_call_serves_the_default_name() -> None:
    forseti = Forseti(Celery("call", set_as_current=False), call="tests.app:Counter")
    from tests.app import Counter

    assert forseti.resolve("default") is Counter and forseti.known_names() == {"default"}


def test_restart_intensity_gives_up_past_max_retries_within_max_time() -> None:
    from forseti_celery.core.broker import RestartIntensity

    intensity = RestartIntensity(max_retries=3, max_time=60)
    assert [intensity.failed() for _ in range(4)] == [True, True, True, False]
    assert RestartIntensity(max_retries=0, max_time=60).failed() is False


def test_the_ref_cache_drops_a_ref_on_its_exit_and_never_caches_a_seen_exit() -> None:
    from forseti_celery.client.cache import RefCache

    cache = RefCache(enabled=True)
    ref = KeyRef("w1@h", 10, "k")
    cache.put(ref)
    assert cache.get("default", "k") is None  # not subscribed to exit events yet
    cache.subscribed(True)
    cache.put(ref)
    assert cache.get("default", "k") is ref
    cache.exited("default", "k", "w1@h", 11)  # another process of the key: not this one
    assert cache.get("default", "k") is ref
    cache.exited("default", "k", "w1@h", 10)
    assert cache.get("default", "k") is None
    cache.put(ref)  # an answer that was in flight when the exit was seen
    assert cache.get("default", "k") is None
    cache.put(KeyRef("w2@h", 12, "k"))
    cache.subscribed(False)
    assert cache.get("default", "k") is None
    disabled = RefCache(enabled=False)
    disabled.subscribed(True)
    disabled.put(ref)
    assert disabled.get("default", "k") is None


def test_the_ref_cache_keeps_no_answer_to_a_request_sent_while_exits_went_unheard() -> None:
    # A new client's first request goes out before its exits subscription is live: the process
    # it names may end unheard before the subscription, so its answer is not cached once the
    # subscription is (nor one asked before a reconnection).
    from forseti_celery.client.cache import RefCache

    cache = RefCache(enabled=True)
    ref = KeyRef("w1@h", 10, "k")
    missed, asked = cache.lookup("default", "k")  # before the subscription
    assert missed is None
    cache.subscribed(True)
    cache.put(ref, asked)
    cache.found("default", "k", ref, asked)
    assert cache.get("default", "k") is None
    asked = cache.epoch()  # a request sent while subscribed: its answer is cached
    cache.found("default", "k", ref, asked)
    assert cache.lookup("default", "k") == (ref, asked)
    cache.subscribed(False)
    cache.subscribed(True)  # reconnected: what was asked on the last connection is not cached
    cache.put(ref, asked)
    assert cache.get("default", "k") is None
