"""A keyed process's per-call work (issue 15, row 4): a frame of one message decoded whole at once
(``codec.decode_line``) and an answer encoded without the general checks (``codec.encode_reply``),
each giving what the general path gives, and leaving it everything else."""

from __future__ import annotations

import _socket
import os

import pytest

from forseti_celery.child.pipe_end import PipeEnd
from forseti_celery.core import codec
from forseti_celery.core.errors import InvalidMessage
from forseti_celery.core.messages import REPLY

_VALUES = [0, 12345, -1.5, 1e22, None, True, "é\u2028\"\\\t\n", [], {}, [[1], {"a": [None]}], {"x": "y" * 100}]


def _plain(to: object, corr: object, value: object, max_size: int = 2**20) -> codec.Encoded:
    return codec.encode_message({"t": REPLY, "r": to, "c": corr}, "reply", max_size, payload=value)


@pytest.mark.parametrize("value", _VALUES)
@pytest.mark.parametrize(("to", "corr"), [("ns.reply.abc", "c01"), ("é\"[{", "c\"\t"), ("r", "")])
def test_an_answer_is_encoded_to_the_bytes_of_encode_message(to: str, corr: str, value: object) -> None:
    for _ in range(2):  # its head encoded, then from the cache
        assert codec.encode_reply(to, corr, value, 2**20) == _plain(to, corr, value)


def test_an_answer_is_refused_as_encode_message_refuses_it() -> None:
    deep: list[object] = []
    for _ in range(codec.MAX_DEPTH):
        deep = [deep]
    for value, max_size, match in [("x" * 100, 100, "at least"), ("x" * 80, 100, "of 112 bytes"),
                                   (deep, 2**20, "nested deeper"), (object(), 2**20, "not JSON-serialisable"),
                                   ("\udcff", 2**20, "not JSON-serialisable"), (float("nan"), 2**20, None)]:
        if match is None:  # what the general path takes (NaN), the fast one takes the same
            assert codec.encode_reply("r", "c", value, max_size) == _plain("r", "c", value, max_size)
            continue
        with pytest.raises(InvalidMessage, match=match) as fast:
            codec.encode_reply("r", "c", value, max_size)
        with pytest.raises(InvalidMessage) as general:
            _plain("r", "c", value, max_size)
        assert str(fast.value) == str(general.value)
    assert codec.encode_reply(1, None, 5, 2**20) == _plain(1, None, 5)  # not texts: the general path


def _general(line: bytes) -> list[codec.Message]:
    batch = codec.decode(line, routed=False)
    codec.decode_payloads(batch)
    return batch


@pytest.mark.parametrize("value", _VALUES)
def test_a_line_of_one_message_decodes_as_the_general_path_decodes_it(value: object) -> None:
    for line in (codec.encode_message({"t": "call", "r": "é", "c": "c"}, "message", 2**20, payload=value).data,
                 codec.encode([{"t": "stop", "reason": "x"}])):
        padded = b"xx" + line + b"yy"
        assert [codec.decode_line(padded, 2, 2 + len(line))] == _general(line)


@pytest.mark.parametrize("line", [
    b'{"t":"cast"}\t1\n{"t":"cast"}\t2',  # two messages
    b'{"t":"cast"} \t1', b'{"t":"cast"}\t 1', b'{"t":"cast"}\t1 ',  # whitespace around either
    b'{"t":\t"cast"}\t1',  # a tab inside the envelope
    b'{"t":"cast"}\t{', b'{"t":"cast"}\t', b'{"t":"cast"}\tNaNa', b'{"t":"cast"}\t"\xed\xa0\x80"',  # payloads
    b'[1]\t1', b'"t"', b'{"t":"cast"', b'', b'{"t":"\xff"}\t1', b'{"t":"cast"}\t1\x00\x00\x00',
    b'{"t":"cast"}\t"' + b"x" * 70000 + b'"',  # large: decoded with the collector paused
])
def test_anything_else_is_left_to_the_general_path(line: bytes) -> None:
    assert codec.decode_line(line, 0, len(line)) is None


def test_a_frame_of_one_call_whose_payload_is_no_json_still_reaches_the_process_as_invalid() -> None:
    ours, theirs = _socket.socketpair()
    try:
        good = b'{"t":"call","r":"r","c":"c"}\t[1,{"a":2}]'
        bad = b'{"t":"call","r":"r","c":"c"}\t[1,'
        for line in (good, bad, good):
            os.write(ours.fileno(), len(line).to_bytes(4, "big") + line)
        got = []
        pipe = PipeEnd(theirs)
        while len(got) < 3:
            got += pipe.read()
        assert [m["m"] for m in got[::2]] == [[1, {"a": 2}]] * 2
        assert isinstance(got[1]["m"], InvalidMessage)
    finally:
        ours.close()
        theirs.close()
