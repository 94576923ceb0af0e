"""Worker messages signed with the worker secret (``forseti_worker_secret``).

Every broker message a worker publishes carries one header, ``forseti-sig``: its sender, a
timestamp, a nonce unique to the message and an HMAC-SHA256, under the first secret, over those,
the exchange, the routing key and the body bytes. A worker takes the messages of the
:data:`WORKER_TYPES` (what only a worker or the leader may say: heartbeats, reports, orders)
only from a broker message whose signature verifies under one of its secrets, was made within
``window`` seconds of now, and whose nonce it has not seen yet; from any other broker message it
keeps only what a client may send anyway (``get``, ``call``, ``stop`` ...), and logs what it
dropped. A client never holds the secret and signs nothing. See docs/security.rst.

:meth:`Signer.headers` is the one hook on publish (:class:`~forseti_celery.core.broker.Publisher`),
:meth:`Signer.admit` the one on receive (:class:`~forseti_celery.core.consumer.ConsumerLoop`).
"""

from __future__ import annotations

import hmac
import itertools
import os
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

from celery.utils.log import get_logger

from . import protocol as p
from .messages import TYPE

logger = get_logger(__name__)

__all__ = ["HEADER", "MAX_SEEN", "WORKER_TYPES", "Signer"]

#: The kombu message header carrying ``"<sender> <timestamp> <nonce> <hmac>"``.
HEADER = "forseti-sig"
#: What only a worker may say: without a valid signature these are dropped, never acted on.
WORKER_TYPES = frozenset({
    p.HEARTBEAT, p.BYE, p.PING, p.LEADS, p.SPAWNED, p.SPAWN_FAILED, p.EXITED, p.SPAWN, p.REPORT_REQUEST, p.REPORT,
})
#: Nonces a worker remembers at most (~10 MB): past it the oldest is forgotten and nothing
#: signed before it is taken any more, so a replay is refused either way.
MAX_SEEN = 100_000
#: Seconds between two log lines of one kind of dropped message (a forger could flood the log).
_LOG_EVERY = 10.0

_REASONS = {
    "unsigned": "without a signature (forged, or the sender has no forseti_worker_secret)",
    "bad": "with a signature that does not verify (forged, or the sender's forseti_worker_secret is "
           "none of this worker's)",
    "stale": "signed outside the replay window (replayed, delayed, or the clocks of the machines are apart)",
    "replayed": "signed, with a nonce already seen (replayed)",
    "malformed": "with an unreadable signature header (forged)",
}


class Signer:
    """Signs what one worker publishes and checks what it receives (its consumer thread's own)."""

    def __init__(self, secrets: Sequence[str], sender: str, window: float) -> None:
        """``secrets``: the first signs, every one verifies (rotation); ``window``: seconds a
        signed message is good for, either side of the receiver's clock."""
        if not secrets:
            raise ValueError("a Signer needs at least one secret")
        self._keys = [s.encode() for s in secrets]
        self._sender = sender
        self._window = window
        self._prefix = os.urandom(6).hex() + "."  # nonces: unique per sender run, then a counter
        self._count = itertools.count()
        self._seen: set[str] = set()
        self._order: deque[tuple[float, str]] = deque()  # (timestamp, nonce) as taken
        self._floor = 0.0  # timestamps at or below it are no longer remembered: refused
        self._logged: dict[str, tuple[float, int, int, str]] = {}  # reason: (when, broker msgs, msgs, sender)
        #: Worker messages dropped so far, per reason ("unsigned", "bad", "stale", "replayed",
        #: "malformed"): the ``dropped`` of ``celery inspect stats``.
        self.dropped: Counter[str] = Counter()

    # -- publish -----------------------------------------------------------------------------
    def headers(self, exchange: str, routing_key: str, body: bytes) -> dict[str, str]:
        """The header that signs ``body`` for ``exchange`` and ``routing_key``."""
        stamp = f"{time.time():.3f}"
        nonce = f"{self._prefix}{next(self._count):x}"
        mac = self._mac(self._keys[0], self._sender, stamp, nonce, exchange, routing_key, body)
        return {HEADER: f"{self._sender} {stamp} {nonce} {mac}"}

    @staticmethod
    def _mac(key: bytes, sender: str, stamp: str, nonce: str, exchange: str, routing_key: str,
             body: bytes) -> str:
        head = "\0".join((sender, stamp, nonce, exchange, routing_key, "")).encode()
        return hmac.digest(key, head + body, "sha256").hex()

    # -- receive -----------------------------------------------------------------------------
    def admit(self, message: Any, batch: list[p.Message]) -> list[p.Message]:
        """What of ``batch`` (decoded from the kombu ``message``) this worker may act on: all of it
        when signed by a worker, else only what a client may send too (the rest is logged)."""
        value = (message.headers or {}).get(HEADER)
        reason, sender = ("unsigned", "?") if value is None else self._check(str(value), message)
        if reason is None:
            return batch
        kept = [m for m in batch if m.get(TYPE) not in WORKER_TYPES]
        if len(kept) != len(batch):
            self._dropped(reason, len(batch) - len(kept), sender)
        return kept

    def _check(self, value: str, message: Any) -> tuple[str | None, str]:
        """(None: good | why not, the sender it names)."""
        try:
            sender, stamp, nonce, mac = value.rsplit(" ", 3)
            ts = float(stamp)
        except ValueError:
            return "malformed", "?"
        body = message.body
        if isinstance(body, str):  # py-amqp hands a UTF-8 body over decoded
            body = body.encode("utf-8", "surrogatepass")
        info = message.delivery_info or {}
        exchange, routing_key = str(info.get("exchange") or ""), str(info.get("routing_key") or "")
        if not any(hmac.compare_digest(mac, self._mac(key, sender, stamp, nonce, exchange, routing_key, body))
                   for key in self._keys):
            return "bad", sender
        now = time.time()
        self._forget(now)
        if not abs(now - ts) <= self._window or ts <= self._floor:
            return "stale", sender
        if nonce in self._seen:
            return "replayed", sender
        self._seen.add(nonce)
        self._order.append((ts, nonce))
        return None, sender

    def _forget(self, now: float) -> None:
        """Forget nonces whose messages are out of the window anyway; keep at most :data:`MAX_SEEN`."""
        order = self._order
        while order and (order[0][0] < now - self._window or len(order) >= MAX_SEEN):
            ts, nonce = order.popleft()
            self._seen.discard(nonce)
            self._floor = max(self._floor, ts)

    def _dropped(self, reason: str, n: int, sender: str) -> None:
        """Count dropped messages; log them at once the first time, then at most every :data:`_LOG_EVERY` s."""
        self.dropped[reason] += n
        now = time.monotonic()
        when, messages, dropped, _ = self._logged.get(reason, (now - _LOG_EVERY, 0, 0, sender))
        messages, dropped = messages + 1, dropped + n
        if now - when < _LOG_EVERY:
            self._logged[reason] = (when, messages, dropped, sender)
            return
        self._logged[reason] = (now, 0, 0, sender)
        logger.warning("forseti: dropped %d worker messages (of %d broker messages) %s; the latest claims to "
                       "be from %s", dropped, messages, _REASONS[reason], sender)


def signer_for(secrets: Sequence[str], sender: str, window: float) -> Signer | None:
    """A :class:`Signer` when a worker secret is set, else ``None`` (nothing signed or checked)."""
    return Signer(secrets, sender, window) if secrets else None
