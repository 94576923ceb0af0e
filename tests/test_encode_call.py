"""A ref's call, the part of its envelope its calls share encoded once (``codec.encode_call``):
the same bytes, the same checks, as the general :func:`~forseti_celery.core.codec.encode_message`;
and its answer read without building a :class:`~forseti_celery.core.messages.Reply` (issue 15)."""

from __future__ import annotations

import time

import pytest

from forseti_celery.client.requests import answer_of
from forseti_celery.core import codec
from forseti_celery.core.codec import NO_PAYLOAD
from forseti_celery.core.errors import InvalidMessage, RemoteError
from forseti_celery.core.messages import NO_VALUE, Call, Reply


def _plain(call: Call, payload: object, max_size: int = 2**20) -> codec.Encoded:
    return codec.encode_message(call.to_wire(), "message", max_size, deadline=call.deadline, payload=payload)


@pytest.mark.parametrize(("name", "key", "pid", "reply_to", "corr", "deadline", "payload"), [
    ("n1", "k1", 42, "ns.reply.abc", "abc01f", time.time() + 5, {"x": 1}),
    ("n1", "é\u2028\"\\", 42, "ns.reply.abc", "abc0", 1e22, "é"),  # escapes; a float JSON writes as 1e+22
    ("n", "[{\"\t", 7, "r", "c\"", 0.1, [[1], {}]),
    ("n1", "k1", True, "r", "c", 2.5, None),  # not an int (never a KeyRef's): cached apart from pid 1
    ("n1", "k1", 1, "r", "c", 2.5, None),
    ("n1", "k1", 1, "r", "c", None, None),  # no deadline: the general path
    ("n1", "k1", 1, "r", "c", 7, 3),  # an int deadline: the general path
])
def test_the_same_bytes_as_encode_message(name: str, key: str, pid: int, reply_to: str, corr: str,
                                          deadline: float | None, payload: object) -> None:
    call = Call(name, key, pid, reply_to, corr, deadline)
    for _ in range(2):  # encoded, then from the cache
        got = codec.encode_call(call, "message", 2**20, payload)
        assert got == _plain(call, payload)
    assert codec.decode(got.data)[0]["p"] == pid


def test_a_key_addressed_call_is_encoded_whole() -> None:
    call = Call("n", "k", 1, "r", "c", 2.5, key_addressed=True, args=[1], seq=3)
    assert codec.encode_call(call, "message", 2**20, "m") == _plain(call, "m")


def test_the_same_refusals_as_encode_message() -> None:
    call = Call("n", "k", 1, "r", "c", 2.5)
    with pytest.raises(InvalidMessage, match=r"message of .* exceeds forseti_max_message_size"):
        codec.encode_call(call, "message", 100, "x" * 100)
    with pytest.raises(InvalidMessage, match="exceeds forseti_max_message_size"):
        codec.encode_call(Call("n", "k" * 90, 1, "r", "c", 2.5), "message", 100, "x")  # the envelope counts
    deep: list[object] = []
    for _ in range(codec.MAX_DEPTH):
        deep = [deep]
    with pytest.raises(InvalidMessage, match="nested deeper"):
        codec.encode_call(call, "message", 2**20, deep)
    with pytest.raises(InvalidMessage, match="not JSON-serialisable"):
        codec.encode_call(call, "message", 2**20, object())
    # A ref rebuilt from JSON may carry a key no wire can: refused as the general path refuses it.
    with pytest.raises(InvalidMessage, match="message is not JSON-serialisable"):
        codec.encode_call(Call("n", "\udcff", 1, "r", "c", 2.5), "message", 2**20, 1)


@pytest.mark.parametrize(("reply", "answer"), [
    (Reply.ok("c", 5), 5), (Reply.ok("c", None), None), (Reply("c"), None), (Reply.ok("c", [1, "é"]), [1, "é"]),
    (Reply("c", payload={"a": [1]}), {"a": [1]}), (Reply("c", reply_to="r", payload="x"), "x"),
], ids=["value", "null value", "nothing", "list", "payload", "payload, reply_to"])
def test_an_answer_is_what_its_reply_carries(reply: Reply, answer: object) -> None:
    # Through the wire, as the client's consumer decodes it (a payload stays raw until read).
    payload = NO_PAYLOAD if reply.payload is NO_VALUE else reply.payload
    wire = codec.decode(codec.encode_message(reply.to_wire(), "reply", 2**20, payload=payload).data)[0]
    assert answer_of(wire) == answer == answer_of(dict(wire, error=None))  # a null error is none


def test_an_error_reply_is_raised_as_its_error() -> None:
    wire = codec.decode(codec.encode_message(Reply.fail("c", "crash", "boom", "ValueError").to_wire(), "reply",
                                             2**20).data)[0]
    with pytest.raises(RemoteError, match="ValueError: boom"):
        answer_of(wire)
    with pytest.raises(InvalidMessage, match="payload is not JSON"):
        answer_of({"t": "reply", "c": "c", "m": codec.Raw(b"\t{", 1)})
