"""A client's plain cast, its envelope encoded once (``codec.encode_cast``): the same bytes, the
same checks, as the general :func:`~forseti_celery.core.codec.encode_message` (issue 15)."""

from __future__ import annotations

import pytest

from forseti_celery.core import codec
from forseti_celery.core.errors import InvalidMessage
from forseti_celery.core.messages import Cast


@pytest.mark.parametrize(("name", "key", "pid", "payload"), [
    ("n1", "k1", 42, {"x": 1}), ("n1", "k1", 42, "é\u2028"), ("n", "[{\"\t", 7, [[1], {}]),
    ("n1", "k1", True, None),  # not an int (never a KeyRef's): cached apart from pid 1
    ("n1", "k1", 1, None),
])
def test_the_same_bytes_as_encode_message(name: str, key: str, pid: int, payload: object) -> None:
    for _ in range(2):  # encoded, then from the cache
        got = codec.encode_cast(name, key, pid, payload, 2**20)
        assert got == codec.encode_message(Cast.envelope(name, key, pid), "message", 2**20, payload=payload)
    assert codec.decode(got.data)[0]["p"] == pid


def test_the_same_limits_as_encode_message() -> None:
    with pytest.raises(InvalidMessage, match="exceeds forseti_max_message_size"):
        codec.encode_cast("n", "k", 1, "x" * 100, 100)
    with pytest.raises(InvalidMessage, match="exceeds forseti_max_message_size"):
        codec.encode_cast("n", "k" * 90, 1, "x", 100)  # the envelope counts
    deep: list[object] = []
    for _ in range(codec.MAX_DEPTH):
        deep = [deep]
    with pytest.raises(InvalidMessage, match="nested deeper"):
        codec.encode_cast("n", "k", 1, deep, 2**20)
    with pytest.raises(InvalidMessage, match="not JSON-serialisable"):
        codec.encode_cast("n", "k", 1, object(), 2**20)
