"""What a spare copies from its parent (issue 15, row 6): every page a freshly forked keyed process
writes is copied, so its path to its first answer touches as little of the inherited heap as it
can. A spare rehearses taking a key while it waits (``Mailbox.rehearse``: those pages are copied
before a caller waits); what only the rehearsal ran would be copied for nothing. Figures (page
faults, USS per keyed process, before and after) in ``docs/benchmarks.rst``."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from forseti_celery.child import runtime
from forseti_celery.core import protocol as p
from forseti_celery.core.messages import Call, Reply


def test_a_spares_rehearsal_makes_no_python_socket_and_encodes_no_assign(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python socket objects (the socket module's class, its enums) and an assign's encoding are
    code taking a key never runs: about 25 pages a keyed process when the rehearsal ran them."""
    made: list[Any] = []
    encoded: list[Any] = []
    real_init, real_encode = socket.socket.__init__, runtime.encode

    def init(self: socket.socket, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        real_init(self, *args, **kwargs)

    def encode(msgs: list[Any]) -> bytes:
        encoded.extend(m.get("t") if isinstance(m, dict) else m for m in msgs)
        return real_encode(msgs)

    monkeypatch.setattr(socket.socket, "__init__", init)
    monkeypatch.setattr(runtime, "encode", encode)
    ours, theirs = socket.socketpair()
    made.clear()
    try:
        runtime.Mailbox(theirs).rehearse()
    finally:
        ours.close()
        theirs.close()
    assert made == []
    assert encoded == ["started"]  # the answer it sends, as a keyed process sends its own


def test_a_keyed_process_answers_a_call_with_the_envelope_a_reply_of_its_payload_has() -> None:
    ours, theirs = socket.socketpair()
    try:
        box = runtime.Mailbox(theirs)
        call = Call("q", "n", 0, "n", "c1").to_wire()
        box.reply({**call, p.PAYLOAD: 1}, [1, "x"])
        to, corr = Call.caller(call)
        expected = p.encode_message(Reply(corr, reply_to=to).to_wire(), "reply", box.max_size, payload=[1, "x"]).data
        assert ours.recv(4096)[4:] == expected
    finally:
        ours.close()
        theirs.close()
