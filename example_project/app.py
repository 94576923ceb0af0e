"""The example's Celery app: one keyed process per chat room, one per sensor, one per web user.

Run workers with ``celery -A example_project.app worker -n chat1@%h``; the broker
comes from ``FORSETI_BROKER_URL`` (Redis or RabbitMQ).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import deque
from typing import Any

from celery import Celery
from celery.utils.log import get_logger

import forseti_celery
from forseti_celery import Forseti, KeyedProcess

logger = get_logger(__name__)

app = Celery("example_project", broker=os.environ.get("FORSETI_BROKER_URL"))
app.conf.update(
    broker_connection_retry_on_startup=True,
    # A namespace of its own, so the example never mixes with another forseti
    # cluster (the test suite's, say) on the same broker.
    forseti_namespace=os.environ.get("FORSETI_NAMESPACE", "chatdemo"),
    # Faster than the defaults (1 s / 8 s / 5 s) so the demo's cluster forms in
    # about a second; a production cluster can keep the defaults.
    forseti_heartbeat=0.5,
    forseti_node_timeout=3.0,
    forseti_lease=2.0,
    # Workers sign their messages to one another with it and believe no others; set it only
    # where workers run (this module is the clients' too, which never need it): see
    # docs/security.rst. Unset (None), nothing is signed.
    forseti_worker_secret=os.environ.get("FORSETI_WORKER_SECRET"),
)
forseti = Forseti(app)

#: What a room name may look like; anything else is refused by ``Room.init``.
ROOM_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


@forseti.keyed
class Room(KeyedProcess):
    """A chat room: its members and its last ``keep`` messages, alive while the room is.

    Calls are dicts with an ``op``: ``join``/``leave`` (``user``), ``post``
    (``user``, ``text``), ``history`` (``last``), ``stats``. Casts take the
    same ``post``/``join``/``leave`` dicts, without an answer. An unknown ``op``
    is a bug in the caller: it raises, which crashes the room (as in OTP).
    """

    def init(self, key: str, keep: int = 50) -> None:
        if not ROOM_NAME.fullmatch(key):
            raise ValueError(f"bad room name {key!r}: lower-case letters, digits and '-', at most 32")
        self.room = key
        self.members: set[str] = set()
        self.messages: deque[dict[str, Any]] = deque(maxlen=int(keep))
        self.posts = 0
        self.started = time.time()
        logger.info("room %s opened in pid %d", key, os.getpid())

    def handle_call(self, msg: dict[str, Any]) -> Any:
        op = msg["op"]
        if op == "join":
            self.members.add(msg["user"])
            return sorted(self.members)
        if op == "leave":
            self.members.discard(msg["user"])
            return sorted(self.members)
        if op == "post":
            return self._post(msg["user"], msg["text"])
        if op == "history":
            return list(self.messages)[-int(msg.get("last", len(self.messages))) :]
        if op == "stats":
            return {
                "room": self.room,
                "members": len(self.members),
                "posts": self.posts,
                "kept": len(self.messages),
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 3),
            }
        raise ValueError(f"unknown op {op!r}")

    def handle_cast(self, msg: dict[str, Any]) -> None:
        if msg["op"] == "post":
            self._post(msg["user"], msg["text"])
        elif msg["op"] in ("join", "leave"):
            self.handle_call(msg)
        else:
            raise ValueError(f"unknown op {msg['op']!r}")

    def terminate(self, reason: str) -> None:
        logger.info("room %s closed (%s) after %d posts", self.room, reason, self.posts)

    def _post(self, user: str, text: str) -> dict[str, Any]:
        # Refusing is an answer, not a crash: the room keeps its state.
        if user not in self.members:
            return {"error": f"{user} is not in {self.room}"}
        self.posts += 1
        self.messages.append({"seq": self.posts, "user": user, "text": text, "at": round(time.time(), 3)})
        return {"seq": self.posts}


@forseti.keyed(name="poller")
def poll_sensor(key: str, interval: float = 0.1, report_to: str | None = None) -> None:
    """Function form: polls the sensor ``key`` every ``interval`` seconds until sent ``"stop"``.

    Also counts readings pushed to it with ``ref.send({"reading": value})``. When it
    ends it posts a summary to the chat room ``report_to``, if given: keyed processes
    can use each other like any other client.
    """
    polled = pushed = 0
    total = 0.0
    try:
        while (msg := forseti_celery.receive(timeout=interval)) != "stop":
            if msg is None:  # nothing arrived within the interval: poll the device
                polled += 1
                total += _read_device(key, polled)
            elif isinstance(msg, dict) and "reading" in msg:
                pushed += 1
                total += float(msg["reading"])
    finally:
        count = polled + pushed
        summary = (f"{key} stopped after {count} readings ({pushed} pushed, {polled} polled), "
                   f"mean {total / count if count else 0.0:.2f}")
        logger.info("sensor %s", summary)
        if report_to:
            room = forseti_celery.get_key(report_to, app=app)
            room.call({"op": "join", "user": key})
            room.call({"op": "post", "user": key, "text": summary})


def _read_device(key: str, n: int) -> float:
    """A stand-in for talking to real hardware: a reading that drifts around 21 °C."""
    return 21.0 + ((len(key) + n) % 7) * 0.1


#: What a user name may look like; anything else is refused by ``UserSession.init``.
USER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


@forseti.keyed(name="user")
class UserSession(KeyedProcess):
    """A web user's session, written with ``async def`` (``example_project.web`` calls it): a
    token-bucket rate limit of ``rate`` requests a second in bursts of up to ``burst``, refilled
    by a background task of the process, and counts of what the user did.

    Calls: ``{"op": "hit"}`` takes a token (``allowed`` says whether one was left), ``{"op":
    "stats"}``. A stop ends the refill task after ``terminate``.
    """

    async def init(self, key: str, rate: float = 5.0, burst: int = 10) -> None:
        if not USER_NAME.fullmatch(key):
            raise ValueError(f"bad user name {key!r}: lower-case letters, digits, '_', '.' and '-'")
        self.user = key
        self.rate, self.burst = float(rate), int(burst)
        self.tokens = float(self.burst)
        self.allowed = self.refused = 0
        self.started = time.time()
        self.create_task(self._refill())  # runs between (and during) the calls below

    async def _refill(self) -> None:
        while True:
            await asyncio.sleep(1.0 / self.rate)
            self.tokens = min(float(self.burst), self.tokens + 1.0)

    async def handle_call(self, msg: dict[str, Any]) -> Any:
        op = msg["op"]
        if op == "hit":
            allowed = self.tokens >= 1.0
            if allowed:
                self.tokens -= 1.0
                self.allowed += 1
            else:
                self.refused += 1
            return {"allowed": allowed, "tokens": int(self.tokens)}
        if op == "stats":
            return {"user": self.user, "allowed": self.allowed, "refused": self.refused, "tokens": int(self.tokens),
                    "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 3)}
        raise ValueError(f"unknown op {op!r}")

    async def terminate(self, reason: str) -> None:
        logger.info("user %s session ended (%s): %d allowed, %d refused", self.user, reason, self.allowed,
                    self.refused)
