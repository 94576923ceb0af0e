"""The pytest plugin as a user would use it: real workers of an app on the embedded Redis."""

from __future__ import annotations

import uuid

from forseti_celery import Forseti
from forseti_celery.testing import ClusterFactory

from .helpers import client_app


def test_a_user_tests_keyed_workers_in_a_few_lines_on_the_embedded_redis(
    forseti_cluster_factory: ClusterFactory, forseti_embedded_broker: str
) -> None:
    namespace = f"plugin-{uuid.uuid4().hex[:8]}"
    cluster = forseti_cluster_factory("tests.app", n=2, broker_url=forseti_embedded_broker,
                                      env={"FORSETI_NAMESPACE": namespace})
    forseti = Forseti.of(client_app(forseti_embedded_broker, namespace))
    try:
        refs = [forseti.get_key(f"user-{i}") for i in range(4)]
        assert {r.node for r in refs} == {w.hostname for w in cluster.workers}
        assert [r.call("get") for r in refs] == [0, 0, 0, 0]
        for r in refs:
            r.stop()
        assert set(forseti.get_metrics().values()) == {0}
    finally:
        forseti.close()
