"""Settings checked the Celery way: unknown ``forseti_*`` keys warned about, bad values refused by name."""

from __future__ import annotations

import logging
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from forseti_celery import ConfigurationError, Forseti
from forseti_celery.core.conf import KeyPolicy, Settings
from forseti_celery.testing import ClusterError, WorkerProcess, short_hostname

BAD_VALUES: list[tuple[str, Any]] = [
    ("heartbeat", "fast"),
    ("heartbeat", 0),
    ("timeout", True),
    ("node_timeout", float("nan")),
    ("lease", float("inf")),
    ("max_time", [1]),
    ("max_retries", 2.5),
    ("max_retries", -1),
    ("spares", "2"),
    ("max_key_length", 0),
    ("max_message_size", 1023),
    ("cache", "yes"),
    ("cache", 1),
    ("nodes", "w1@host"),
    ("nodes", ["w1@host", 3]),
    ("namespace", "a b"),
    ("namespace", 42),
    ("call", ""),
    ("call", print),
    ("idle_timeout", 0),
    ("idle_timeout", -1),
    ("idle_timeout", "300"),
    ("idle_timeout", True),
    ("idle_timeout", float("nan")),
    ("restart", "always"),
    ("restart", "Transient"),
    ("restart", 1),
    ("max_restarts", -1),
    ("max_restarts", 1.5),
    ("max_restarts", True),
    ("restart_window", 0),
    ("restart_window", "60"),
    ("handoff_timeout", 0),
    ("handoff_timeout", "30"),
    ("rebalance", "always"),
    ("rebalance", True),
    ("rebalance_batch", 0),
    ("rebalance_batch", 2.5),
    ("state_url", "http://localhost:6379"),
    ("state_url", ""),
    ("state_url", 6379),
    ("checkpoint_every", 0),
    ("checkpoint_every", "5"),
    ("checkpoint_every", True),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_a_bad_value_in_app_conf_is_a_configuration_error_naming_the_key_and_the_value(name: str, value: Any) -> None:
    app = Celery("bad", set_as_current=False)
    app.conf[f"forseti_{name}"] = value
    forseti = Forseti(app)
    with pytest.raises(ConfigurationError) as info:
        forseti.settings  # noqa: B018  (read on first use)
    assert f"forseti_{name}" in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_a_bad_keyword_argument_is_refused_by_forseti_at_once_the_same_way(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        Forseti(Celery("bad", set_as_current=False), **{name: value})
    assert f"forseti_{name}" in str(info.value) and repr(value) in str(info.value)


def test_the_worker_secret_is_a_str_or_a_list_of_them_and_never_shown() -> None:
    for value, kept in (("s3cret", ("s3cret",)), (["new", "old"], ("new", "old")), (("new",), ("new",))):
        app = Celery("secret", set_as_current=False)
        app.conf.forseti_worker_secret = value
        settings = Forseti(app).settings
        assert settings.worker_secret == kept
        assert "s3cret" not in repr(settings) and "old" not in repr(settings)
    assert Settings().worker_secret == ()
    for bad in ("", [], ["ok", ""], [b"bytes-secret"], 42):
        with pytest.raises(ConfigurationError) as info:
            Forseti(Celery("bad", set_as_current=False), worker_secret=bad)
        assert "forseti_worker_secret" in str(info.value) and "bytes-secret" not in str(info.value)


def test_good_values_are_kept_in_the_fields_types() -> None:
    app = Celery("good", set_as_current=False)
    app.conf.update(forseti_heartbeat=2, forseti_node_timeout=7, forseti_nodes=["a@x", "b@x"], forseti_cache=False,
                    forseti_spares=0, forseti_call="tests.app:Counter")
    s = Settings.from_app(app.conf, max_retries=0, namespace="shop-1")
    assert (s.heartbeat, s.node_timeout, s.nodes, s.cache, s.spares, s.call, s.max_retries, s.namespace) == (
        2.0, 7.0, ("a@x", "b@x"), False, 0, "tests.app:Counter", 0, "shop-1")
    assert isinstance(s.heartbeat, float)


def test_the_lifecycle_settings_default_to_todays_behaviour() -> None:
    s = Settings.from_app(Celery("defaults", set_as_current=False).conf)
    assert (s.idle_timeout, s.restart, s.max_restarts, s.restart_window) == (None, "temporary", 3, 60.0)
    assert s.policy() == KeyPolicy(None, "temporary", 3, 60.0)


def test_the_state_settings_default_to_no_handoff_time_limit_change_no_rebalance_and_no_checkpoints() -> None:
    s = Settings.from_app(Celery("defaults", set_as_current=False).conf)
    assert (s.handoff_timeout, s.rebalance, s.rebalance_batch, s.state_url, s.checkpoint_every) == (
        30.0, "off", 10, None, None)
    app = Celery("state", set_as_current=False)
    app.conf.update(forseti_handoff_timeout=5, forseti_rebalance="on_join", forseti_rebalance_batch=3,
                    forseti_state_url="redis://127.0.0.1:6379/3", forseti_checkpoint_every=2)
    s = Settings.from_app(app.conf)
    assert (s.handoff_timeout, s.rebalance, s.rebalance_batch, s.state_url, s.checkpoint_every) == (
        5.0, "on_join", 3, "redis://127.0.0.1:6379/3", 2.0)


def test_automatic_checkpoints_without_a_state_url_are_a_configuration_error() -> None:
    app = Celery("state", set_as_current=False)
    app.conf.forseti_checkpoint_every = 5
    with pytest.raises(ConfigurationError, match="forseti_state_url"):
        Settings.from_app(app.conf)


POLICY_BAD_VALUES = [(name, value) for name, value in BAD_VALUES
                     if name in ("idle_timeout", "restart", "max_restarts", "restart_window")]


@pytest.mark.parametrize(("name", "value"), POLICY_BAD_VALUES)
def test_a_bad_keyed_keyword_is_refused_at_decoration_naming_the_keyword_and_the_value(name: str, value: Any) -> None:
    forseti = Forseti(Celery("bad", set_as_current=False))
    with pytest.raises(ConfigurationError) as info:
        forseti.keyed(name="session", **{name: value})
    assert f"keyword {name}:" in str(info.value) and repr(value) in str(info.value)
    assert "session" not in forseti.known_names()


def test_an_unknown_keyed_keyword_is_a_type_error_as_for_any_function() -> None:
    with pytest.raises(TypeError, match="idle_timout"):
        Forseti(Celery("typo", set_as_current=False)).keyed(name="s", idle_timout=3)  # type: ignore[call-overload]


def test_each_name_has_its_own_policy_its_keywords_winning_over_app_conf() -> None:
    app = Celery("policy", set_as_current=False)
    app.conf.update(forseti_idle_timeout=30, forseti_restart="transient", forseti_max_restarts=5,
                    forseti_restart_window=120, forseti_call="tests.app:Counter")
    forseti = Forseti(app)

    @forseti.keyed(name="session", idle_timeout=2.5, restart="permanent")
    def session(key: str) -> None: ...

    @forseti.keyed(name="forever", idle_timeout=None, max_restarts=0, restart_window=1)
    def forever(key: str) -> None: ...

    @forseti.keyed(name="plain")
    def plain(key: str) -> None: ...

    assert forseti.policy("session") == KeyPolicy(2.5, "permanent", 5, 120.0)
    # None is a value: never passivate, whatever forseti_idle_timeout says.
    assert forseti.policy("forever") == KeyPolicy(None, "transient", 0, 1.0)
    assert forseti.policy("plain") == KeyPolicy(30.0, "transient", 5, 120.0)
    # "default" served through forseti_call, and a name never registered: the settings alone.
    assert forseti.policy("default") == forseti.policy("nobody") == KeyPolicy(30.0, "transient", 5, 120.0)
    assert isinstance(forseti.policy("session").idle_timeout, float)


def test_conf_read_after_decoration_still_fills_in_a_names_policy() -> None:
    app = Celery("late", set_as_current=False)
    forseti = Forseti(app)

    @forseti.keyed(name="session", restart="transient")
    def session(key: str) -> None: ...

    app.conf.forseti_idle_timeout = 9  # configured after the module registered its names
    assert forseti.policy("session") == KeyPolicy(9.0, "transient", 3, 60.0)


def test_a_policy_is_frozen() -> None:
    policy = Settings().policy(idle_timeout=1)
    with pytest.raises(AttributeError):
        policy.idle_timeout = 2  # type: ignore[misc]


def test_keyword_arguments_are_checked_alone_and_against_app_conf_once_read() -> None:
    app = Celery("both", set_as_current=False)
    app.conf.forseti_node_timeout = 20.0
    forseti = Forseti(app, heartbeat=3.0)  # too slow for the default node_timeout, not for this app's
    assert forseti.settings.heartbeat == 3.0
    with pytest.raises(ConfigurationError, match=r"forseti_node_timeout \(20.0\) must exceed three heartbeats"):
        Settings.from_app(app.conf, heartbeat=7.0)


def test_an_unknown_keyword_argument_names_the_closest_setting() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown forseti settings: \['namspace'\].*did you mean namespace"):
        Forseti(Celery("typo", set_as_current=False), namspace="x")


def test_a_client_warns_once_per_app_about_each_unknown_key_of_app_conf(caplog: pytest.LogCaptureFixture) -> None:
    app = Celery("typo", set_as_current=False)
    app.conf.update(forseti_namspace="x", FORSETI_SPARES=3, forseti_colour="blue", broker_url="memory://")
    forseti = Forseti(app)
    with caplog.at_level(logging.WARNING, logger="forseti_celery.core.conf"):
        assert forseti.settings.namespace == "forseti" and forseti.settings.spares == 2
        forseti.settings  # noqa: B018  (read once: no second warning)
    warnings = [r.getMessage() for r in caplog.records if r.name == "forseti_celery.core.conf"]
    assert warnings[:2] == ["forseti: unknown setting FORSETI_SPARES (did you mean forseti_spares?)",
                            "forseti: unknown setting forseti_colour (known: forseti_call, forseti_nodes, "
                            "forseti_max_retries, forseti_max_time, forseti_timeout, forseti_call_timeout, "
                            "forseti_cache, forseti_retry_interval, forseti_heartbeat, forseti_node_timeout, "
                            "forseti_lease, forseti_spares, forseti_zygote, forseti_stop_timeout, forseti_namespace, "
                            "forseti_max_key_length, forseti_mailbox_limit, forseti_max_message_size, "
                            "forseti_worker_secret, forseti_idle_timeout, forseti_restart, "
                            "forseti_max_restarts, forseti_restart_window, forseti_handoff_timeout, "
                            "forseti_rebalance, forseti_rebalance_batch, forseti_state_url, "
                            "forseti_checkpoint_every)"]
    assert warnings[2:] == ["forseti: unknown setting forseti_namspace (did you mean forseti_namespace?)"]


def _worker_of(tmp_path: Path, broker_url: str, conf: str) -> WorkerProcess:
    """A real worker of an app module written here, whose ``app.conf`` gets ``conf`` (Python lines)."""
    (tmp_path / "conf_app.py").write_text(textwrap.dedent("""\
        import os
        from celery import Celery
        from forseti_celery import Forseti

        app = Celery("conf_app", broker=os.environ["FORSETI_BROKER_URL"])
        app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
                        forseti_namespace="conf-{tag}", task_default_queue="conf-{tag}")
        {conf}
        Forseti(app)
        """).format(tag=uuid.uuid4().hex[:8], conf=conf))
    hostname = f"conf-{uuid.uuid4().hex[:6]}@{short_hostname()}"
    return WorkerProcess("conf_app", hostname, broker_url, tmp_path / "logs", pool="solo", cwd=tmp_path,
                         extra_args=["--without-mingle", "--without-gossip"])


def test_a_worker_warns_at_start_about_a_misspelt_setting_naming_the_closest_one(
    redis_url: str, tmp_path: Path
) -> None:
    worker = _worker_of(tmp_path, redis_url, 'app.conf.forseti_namspace = "x"').start()
    try:
        worker.wait_ready()
        assert "unknown setting forseti_namspace (did you mean forseti_namespace?)" in worker.log_text()
    finally:
        worker.stop()


def test_a_worker_with_a_bad_setting_stops_with_a_configuration_error_naming_it(
    redis_url: str, tmp_path: Path
) -> None:
    worker = _worker_of(tmp_path, redis_url, 'app.conf.forseti_heartbeat = "fast"').start()
    try:
        with pytest.raises(ClusterError, match="exited with code"):
            worker.wait_ready()
        assert "forseti_heartbeat must be a positive number of seconds, not 'fast'" in worker.log_text()
    finally:
        worker.stop()


def test_the_lifecycle_settings_given_to_forseti_are_every_names_defaults() -> None:
    app = Celery("explicit", set_as_current=False)
    app.conf.update(forseti_restart="permanent", forseti_idle_timeout=5)
    forseti = Forseti(app, restart="transient", max_restarts=0)

    @forseti.keyed(name="own", restart="temporary")
    def own(key: str) -> None: ...

    assert forseti.policy("other") == KeyPolicy(5.0, "transient", 0, 60.0)
    assert forseti.policy("own") == KeyPolicy(5.0, "temporary", 0, 60.0)
