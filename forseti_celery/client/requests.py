"""What the client's sync and async sides share: a request to wait for an answer to
(:class:`Ask`), the checks of what callers give, and the answer decoded.

The client's logic (get_key, call, key-addressed call …) is written once, as generators
that yield an :class:`Ask` where they need an answer (see :mod:`.client`); the sync client
drives them with blocking waits (:func:`drive`), the async one with awaits (:mod:`.aio`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ..core.codec import NO_PAYLOAD, PAYLOAD, Message, decode_payload
from ..core.conf import checked_timeout
from ..core.errors import InvalidArgument, InvalidKey, remote_error
from ..core.keyref import KeyRef
from ..core.messages import NO_VALUE, REPLY, Call, Get, Metrics, Reply, Search, StopKey

__all__ = ["Ask", "Pending", "Steps", "Waiter", "answer_of", "check_key", "check_ref", "drive", "timeout_of"]

T = TypeVar("T")

#: What a client asks and waits for an answer to (each carries its reply queue, correlation id
#: and deadline).
Request = Get | Search | Metrics | StopKey | Call


@dataclass(frozen=True, slots=True)
class Ask:
    """``msg`` (and its ``payload``) to send to ``routing_key`` and wait ``timeout`` seconds for
    its answer; ``resend``: again every ``forseti_retry_interval`` while unanswered (the leader's
    requests); ``what`` names the part an :class:`~forseti_celery.InvalidMessage` refuses."""

    routing_key: str
    msg: Request
    timeout: float
    resend: bool
    what: str = "request"
    payload: Any = NO_PAYLOAD


#: A client operation: yields what it asks, is sent each answer (or thrown its error), returns a T.
Steps = Generator[Ask, Any, T]


def drive(steps: Steps[T], request: Callable[[Ask], Any]) -> T:
    """Run ``steps`` to their end, answering each :class:`Ask` with ``request(ask)`` (a blocking
    wait): its result is sent in, its exception thrown in (a ``finally`` there sees it)."""
    answer: Any = None
    failure: BaseException | None = None
    while True:
        try:
            ask = steps.throw(failure) if failure is not None else steps.send(answer)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        failure = None
        try:
            answer = request(ask)
        except BaseException as exc:  # the steps decide; their finally runs
            failure = exc


class Waiter(Protocol):
    """Who waits for the answer to one request: the client's consumer thread hands it over."""

    #: The answer once it came (None while awaited).
    reply: Message | None

    def deliver(self, reply: Message) -> None: ...


class Pending:
    """A sync caller waiting for the answer to one request.

    A caller first reads the answers itself when it can (``ConsumerLoop.drive``), then waits. A
    lock taken at creation and released by the first answer: the caller's :meth:`wait` blocks
    on it directly, where an ``Event`` adds a condition (a lock of its own per wait, two more
    acquisitions) on both sides. A second answer (a resent request answered twice) is ignored.
    """

    __slots__ = ("_answered", "reply")

    def __init__(self) -> None:
        self._answered = threading.Lock()
        self._answered.acquire()
        self.reply: Message | None = None  # decoded (Reply.from_wire) on the caller's thread

    def deliver(self, reply: Message) -> None:
        """The answer came (called by whoever holds the consumer's work, the only one that delivers:
        its thread, or a caller driving it)."""
        if self.reply is None:
            self.reply = reply
            self._answered.release()

    def answered(self) -> bool:
        """Whether the answer came (read by a caller driving the consumer's reads)."""
        return self.reply is not None

    def wait(self, timeout: float) -> bool:
        """Whether the answer came within ``timeout`` seconds (at once if it came before)."""
        if self._answered.acquire(timeout=timeout):
            self._answered.release()  # a later wait returns at once, as an Event's
            return True
        return False


def answer_of(reply: Message) -> Any:
    """What a reply answers: its value or payload, or the typed error it carries raised."""
    if reply.get("error") is None:  # an answer, read as Reply.from_wire would (without building one)
        raw = reply.get(PAYLOAD, NO_VALUE)
        return reply.get("v") if raw is NO_VALUE else decode_payload(raw, REPLY)
    r = Reply.from_wire(reply)
    if r.error is not None:
        raise remote_error(r.error, r.exc_type or "", r.text or "")
    if r.payload is not NO_VALUE:
        return decode_payload(r.payload, REPLY)
    return None if r.value is NO_VALUE else r.value


def _utf8(text: str) -> bool:
    """Whether the wire (UTF-8) can carry ``text``: not so for a lone surrogate such as "\udcff"."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_key(key: Any, name: Any, max_key_length: int) -> None:
    """Refuse a key that is no valid text or too long (:class:`InvalidKey`), a bad name."""
    if not isinstance(key, str):
        raise InvalidKey(f"keys are str, not {type(key).__name__}")
    if len(key) > max_key_length:
        raise InvalidKey(f"key of {len(key)} characters exceeds forseti_max_key_length")
    if not _utf8(key):
        raise InvalidKey(f"key {key!r} is not valid text (UTF-8 cannot carry it: a lone surrogate?)")
    if not isinstance(name, str) or not name or not _utf8(name):
        raise InvalidArgument(f"name must be a non-empty str of valid text, not {name!r}")


def check_ref(ref: Any, namespace: str) -> None:
    """Refuse what is no :class:`KeyRef` of ``namespace``."""
    if not isinstance(ref, KeyRef):
        raise InvalidArgument(f"expected a KeyRef, not {type(ref).__name__}")
    if ref.namespace != namespace:
        # Served here, it would reach a worker of this cluster that happens to have its name.
        raise InvalidArgument(f"the ref of {ref.key!r} belongs to namespace {ref.namespace!r}, "
                              f"not to this client's {namespace!r}")


def timeout_of(timeout: Any, default: float) -> float:
    """``timeout`` checked (:class:`InvalidArgument`), or ``default`` for None."""
    t = checked_timeout(timeout, default)
    assert t is not None
    return t
