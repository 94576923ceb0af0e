"""redis-py names itself to the server (``CLIENT SETINFO``) with its version, which redis-py 8
looks up in the package metadata for every connection; forseti has it read ``redis.__version__``
(``core/transport/redis.use_package_version``, guard ``REDIS_LIB_VERSION``)."""

from __future__ import annotations

import importlib.metadata

import pytest
import redis
import redis.utils

from forseti_celery.core.transport import redis as redis_transport


def test_the_version_redis_py_names_itself_with_is_its_package_version(redis_url: str) -> None:
    assert redis_transport.REDIS_LIB_VERSION.ok(), "the guard refuses the installed redis-py"
    assert redis.utils.get_lib_version is redis_transport._lib_version  # applied on import
    assert redis.utils.get_lib_version() == importlib.metadata.version("redis")
    client = redis.Redis.from_url(redis_url)
    try:
        client.ping()
        me = client.client_info()
        assert me.get("lib-ver") in (None, importlib.metadata.version("redis"))  # servers before 7.2 keep none
    finally:
        client.close()


def test_with_the_guard_off_redis_py_keeps_its_own_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    original = object()
    monkeypatch.setattr(redis.utils, "get_lib_version", original)
    with redis_transport.REDIS_LIB_VERSION.forced(False):
        redis_transport.use_package_version()
    assert redis.utils.get_lib_version is original
    with redis_transport.REDIS_LIB_VERSION.forced(True):
        redis_transport.use_package_version()
    assert redis.utils.get_lib_version is redis_transport._lib_version
