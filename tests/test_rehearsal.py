"""The worker's rehearsal of a sync keyed process (``forseti_celery.child.rehearsal``): the code a
keyed process runs for its start, calls, casts and stop is specialised in the worker, before any
fork, so keyed processes share it instead of each copying the pages it sits on."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from forseti_celery.child import rehearsal, runtime
from forseti_celery.core import process

_CHECK = textwrap.dedent("""
    import dis, sys
    if sys.argv[1] == "rehearsed":
        import forseti_celery.child
    else:  # the same modules, without the package's import (which rehearses)
        sys.modules["forseti_celery.child"] = type(sys)("forseti_celery.child")
        sys.modules["forseti_celery.child"].__path__ = [
            __import__("os").path.join(__import__("forseti_celery").__path__[0], "child")]
    from forseti_celery.child import runtime
    from forseti_celery.core import codec, protocol
    from forseti_celery.child import pipe_end
    fns = [runtime.serve, runtime.Mailbox.take, runtime.Mailbox.get, runtime.Mailbox.reply, protocol.encode_message,
           pipe_end.PipeEnd.read, pipe_end.PipeEnd.write, codec.encode_reply, codec.decode_line]
    base = set(dis.opmap)
    print(sum(any(i.opname not in base for i in dis.get_instructions(f, adaptive=True)) for f in fns), len(fns))
""")


def _specialised(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _CHECK, mode], capture_output=True, text=True, check=True, timeout=60)
    done, total = out.stdout.split()
    return int(done), int(total)


def test_a_worker_has_specialised_the_code_of_a_sync_keyed_process_before_it_forks_one() -> None:
    if sys.version_info < (3, 11) or sys.version_info >= (3, 14):
        import pytest
        pytest.skip("CPython 3.11-3.13's adaptive instructions are what is checked")
    done, total = _specialised("rehearsed")
    assert done == total, f"only {done} of {total} hot functions specialised after the worker's rehearsal"
    fresh, _ = _specialised("fresh")
    assert fresh < total, "specialised without a rehearsal: the check cannot tell"


def test_the_rehearsal_leaves_the_process_globals_it_borrows_as_they_were() -> None:
    mailbox, state = object(), object()
    process._mailbox, process._state = mailbox, state  # type: ignore[assignment]
    try:
        rehearsal.rehearse()
        assert process._mailbox is mailbox and process._state is state
    finally:
        process._mailbox = process._state = None


def test_a_mailbox_reads_its_pipe_when_it_waits_and_take_reads_it_when_told() -> None:
    import billiard

    from forseti_celery.core.messages import Cast
    from forseti_celery.core.protocol import PAYLOAD, encode, encode_message

    ours, theirs = billiard.Pipe(duplex=True)
    try:
        box = runtime.Mailbox(theirs)
        assert box.get(timeout=0.05) is None
        cast = encode_message(Cast.envelope("n", "k", 1), "message", 2**20, payload=[1, 2])
        ours.send_bytes(encode([cast]))
        msg = box.get(timeout=1)  # read by the waiting thread itself
        assert msg is not None and msg[PAYLOAD] == [1, 2]
        ours.send_bytes(encode([cast]))
        box.take()
        assert box.ready() == msg
    finally:
        ours.close()
        theirs.close()
