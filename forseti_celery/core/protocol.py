"""The wire in one import: every message type, queue, exchange and event name, and the codec.

All traffic goes through the Celery app's broker. A kombu message body holds
protocol messages a line each (JSON objects with a ``"t"`` type field: the
*envelope*), so hot paths can batch many messages into one broker message while
keeping their order; the message of a cast or call and the value of a reply (the
*payload*) follow their envelope on its line, after a tab, as JSON bytes that a
worker forwards to the keyed process (or back) without decoding them. See
``docs/design.rst``.

This module owns nothing of its own: it names, for ``from ..core import protocol as
p``, what is defined in :mod:`.messages` (the message types; the kinds as dataclasses
there, in :mod:`.worker_messages` and :mod:`.pipe`), :mod:`.codec` (framing, limits,
shape checks) and :mod:`.names` (queues, exchanges, events).
"""

from __future__ import annotations

from .codec import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    MAX_DEPTH,
    NO_PAYLOAD,
    PAYLOAD,
    Chunk,
    Encoded,
    Message,
    Raw,
    check_json,
    decode,
    decode_payload,
    decode_payloads,
    encode,
    encode_message,
    encode_parts,
    payload,
)
from .messages import (
    BYE,
    CALL,
    CAST,
    EXITED,
    FOLLOWED,
    GET,
    HEARTBEAT,
    LEADS,
    METRICS,
    MOVE,
    PING,
    REPLY,
    REPORT,
    REPORT_REQUEST,
    SEARCH,
    SPAWN,
    SPAWN_FAILED,
    SPAWNED,
    STOP,
    STOP_KEY,
)
from .names import (
    CACHE_EVENTS,
    EVENT_EXITED,
    EVENT_GIVEN_UP,
    EVENT_LEADER,
    EVENT_MOVED,
    EVENT_NODE_LOST,
    EVENT_RESTARTED,
    EVENT_STARTED,
    NODE_QUEUE_EXPIRES,
    REDIS_CACHE_EVENTS_PATTERN,
    Names,
    event_routing_key,
)

__all__ = [
    "BYE", "CACHE_EVENTS", "CALL", "CAST", "CONTENT_ENCODING", "CONTENT_TYPE", "EVENT_EXITED", "EVENT_GIVEN_UP",
    "EVENT_LEADER", "EVENT_MOVED", "EVENT_NODE_LOST", "EVENT_RESTARTED", "EVENT_STARTED", "EXITED", "FOLLOWED",
    "GET", "HEARTBEAT", "LEADS", "MAX_DEPTH", "METRICS", "MOVE", "NODE_QUEUE_EXPIRES", "NO_PAYLOAD", "PAYLOAD", "PING",
    "REDIS_CACHE_EVENTS_PATTERN",
    "REPLY", "REPORT", "REPORT_REQUEST", "SEARCH", "SPAWN", "SPAWNED", "SPAWN_FAILED", "STOP", "STOP_KEY", "Chunk",
    "Encoded", "Message", "Names", "Raw", "check_json", "decode", "decode_payload", "decode_payloads", "encode",
    "encode_message", "encode_parts", "event_routing_key", "payload",
]
