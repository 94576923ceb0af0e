"""The codec: how protocol messages become a broker message's body (or a pipe's frame) and back.

Owns the framing of ``docs/design.rst`` (Messages): a message a line, its envelope a
JSON object with a ``"t"`` type field, the payload of a cast, a call or a reply after
it and a tab, as JSON bytes a worker forwards without decoding (:class:`Raw`); the
limits a sender checks (:func:`encode_message`: size and depth); and the shape checks
a reader makes (:func:`_well_formed`), so that a message dropped for its shape costs
only itself. What each kind's envelope holds is :mod:`.messages`'.
"""

from __future__ import annotations

import functools
import gc
import json
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from celery.utils.log import get_logger

from . import messages
from .errors import InvalidMessage
from .messages import CALL, CAST, GET, METRICS, REPLY, SEARCH, STOP, STOP_KEY

logger = get_logger(__name__)

CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"

#: A message as the codec reads and writes it (a typed message's ``to_wire()``).
Message = messages.Wire

#: Deepest nesting of lists and objects in a message or in ``get_key`` args (the value sent, not
#: counting forseti's envelope around it). ``json`` decodes a nesting level per Python stack frame,
#: against the recursion limit (1000) minus the frames of whoever decodes: a client's caller, a
#: worker's consumer thread, a keyed process each sit 30 to 60 frames deep, so 200 levels decode
#: everywhere with room to spare, where ~950 already failed in a worker.
MAX_DEPTH = 200
#: The field carried as the payload, after its envelope: a cast's or call's message, a reply's
#: value. Decoded (:func:`decode`), it holds a :class:`Raw`: the payload's line, undecoded (a
#: memoryview of the body when large: no copy); :func:`payload` decodes it, where it is used.
PAYLOAD = messages.PAYLOAD
#: ``json.dumps`` never writes a raw control character (it escapes them in strings, whatever
#: ``ensure_ascii``), and no byte of a UTF-8 sequence for a character past ASCII is below 0x80:
#: a newline ends a message, the first tab of its line ends its envelope.
_LINE = b"\n"
_TAB = b"\t"
_OWN_CHUNK = 16384  # bytes: a payload this large is written to a pipe as it came, not copied into a frame
_NO_GC_FROM = 65536  # bytes: a JSON text this large is decoded with the garbage collector paused
#: ``payload`` of :func:`encode_message` for a message without one.
NO_PAYLOAD: Any = object()


class Encoded(NamedTuple):
    """A protocol message encoded once, by its sender, and checked against the limits
    (see :func:`encode_message`): one line, its envelope and payload."""

    data: bytes
    #: When a leader request stops mattering (``time.time()``): its broker message expires then.
    deadline: float | None = None


#: ensure_ascii=False: non-ASCII text as UTF-8 (one to four bytes, not a 6- or 12-byte escape);
#: UTF-8 then refuses what no JSON reader could take (a lone surrogate such as "\udcff"). One
#: encoder for every message: ``json.dumps`` with arguments builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _dumps(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()


def encode_message(msg: Message, what: str, max_size: int, deadline: float | None = None,
                   payload: Any = NO_PAYLOAD, head: bytes | None = None) -> Encoded:
    """Encode one message at its sender, the envelope ``msg`` and its ``payload`` if it has one
    (a cast's or call's message, a reply's value), checked: raises :class:`InvalidMessage`, naming
    ``what`` (``"message"``, ``"args"``, ``"reply"``), when JSON cannot carry it, when it is nested
    deeper than :data:`MAX_DEPTH` or when it takes more than ``max_size`` bytes
    (forseti_max_message_size). ``head``: ``msg`` encoded already (see :func:`encode_cast`)."""
    least = 0 if head is None else len(head)  # bytes at least: a text or list encodes to one per character or item
    for v in (*(msg.values() if head is None else ()), payload):
        if isinstance(v, (str, list, tuple)):
            least += len(v)
    if least > max_size:  # a giant text or list is refused without the seconds encoding it takes
        raise InvalidMessage(f"{what} of at least {least} bytes (encoded) exceeds forseti_max_message_size "
                             f"({max_size} bytes)")
    try:
        data = head or _dumps(msg)
        if payload is not NO_PAYLOAD:
            data += _TAB + _dumps(payload)
    except RecursionError:
        raise InvalidMessage(f"{what} is nested deeper than {MAX_DEPTH} levels") from None
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(f"{what} is not JSON-serialisable: {exc}") from exc
    if len(data) > max_size:
        raise InvalidMessage(f"{what} of {len(data)} bytes (encoded) exceeds forseti_max_message_size "
                             f"({max_size} bytes)")
    # Counting brackets (strings' included) is C speed and settles almost every message; only one
    # with more brackets than the limit has its nesting measured (a payload one level below the
    # envelope, as it would be inside it).
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH + 1 and _deeper(
            msg if payload is NO_PAYLOAD else [msg, payload], MAX_DEPTH + 1):
        raise InvalidMessage(f"{what} is nested deeper than {MAX_DEPTH} levels")
    return Encoded(data, deadline)


@functools.lru_cache(maxsize=1024, typed=True)
def _cast_head(name: str, key: str, pid: int) -> bytes:
    return _dumps(messages.Cast.envelope(name, key, pid))


def encode_cast(name: str, key: str, pid: int, payload: Any, max_size: int) -> Encoded:
    """``encode_message(Cast.envelope(name, key, pid), "message", max_size, payload=payload)``, the
    same bytes, its envelope encoded once per process (the last 1024 kept): a client's sends are
    its hot path, and encoding an envelope costs more than a small payload."""
    return encode_message(messages.Cast.envelope(name, key, pid), "message", max_size, payload=payload,
                          head=_cast_head(name, key, pid))


@functools.lru_cache(maxsize=1024, typed=True)
def _call_head(name: str, key: str, pid: int, reply_to: str) -> bytes:
    return _dumps({"n": name, "k": key, "p": pid, "t": CALL, "r": reply_to})[:-1]


def encode_call(call: messages.Call, what: str, max_size: int, payload: Any) -> Encoded:
    """``encode_message(call.to_wire(), what, max_size, call.deadline, payload)``, the same
    bytes, the part of its envelope a ref's calls share encoded once per process (the last 1024
    kept): ``ref.call`` is a client's hot path, and encoding a whole envelope costs more than a
    small payload. A key-addressed call's envelope is encoded whole."""
    d = call.deadline
    if call.key_addressed or type(d) is not float or not math.isfinite(d):
        return encode_message(call.to_wire(), what, max_size, deadline=d, payload=payload)
    try:
        head = b'%b,"c":%b,"d":%b}' % (_call_head(call.name, call.key, call.pid, call.reply_to), _dumps(call.corr),
                                       float.__repr__(d).encode())  # the JSON encoder's float
    except (TypeError, ValueError):  # what encode_message refuses, saying why
        return encode_message(call.to_wire(), what, max_size, deadline=d, payload=payload)
    return encode_message(call.to_wire(), what, max_size, deadline=d, payload=payload, head=head)


@functools.lru_cache(maxsize=64, typed=True)
def _reply_head(reply_to: str) -> bytes:
    return _dumps({"t": REPLY, "r": reply_to, "c": ""})[:-3]  # up to the corr's value: ``...,"c":``


def encode_reply(reply_to: Any, corr: Any, value: Any, max_size: int) -> Encoded:
    """``encode_message({"t": REPLY, "r": reply_to, "c": corr}, "reply", max_size, payload=value)``,
    the same bytes and the same refusals, without its generic checks for a small answer: a keyed
    process answers every call so, and those checks cost as much as the rest of its Python work."""
    if type(reply_to) is str and type(corr) is str and not (isinstance(value, (str, list, tuple))
                                                             and len(value) > max_size):
        try:
            data = b"%b%b}\t%b" % (_reply_head(reply_to), _dumps(corr), _dumps(value))
        except (TypeError, ValueError, RecursionError):
            data = b""  # encode_message says why
        if data and len(data) <= max_size and data.count(b"[") + data.count(b"{") <= MAX_DEPTH + 1:
            return Encoded(data)
    return encode_message({"t": REPLY, "r": reply_to, "c": corr}, "reply", max_size, payload=value)


def _deeper(value: Any, limit: int) -> bool:
    """Whether the container ``value`` nests lists or dicts more than ``limit`` levels deep."""
    level = [value]
    for _ in range(limit):
        level = [v for c in level for v in (c.values() if isinstance(c, dict) else c)
                 if isinstance(v, (dict, list, tuple))]
        if not level:
            return False
    return True


def check_json(value: Any, what: str, max_size: int = 2**63) -> None:
    """Refuse ``value`` before anything is sent if it could not be sent (see :func:`encode_message`)."""
    encode_message({"v": value}, what, max_size)


Chunk = bytes | bytearray | memoryview


class Raw(NamedTuple):
    """A decoded message's payload as it came: ``line[at:]``, on the line of its envelope. A worker
    forwards the whole line, envelope included, as it came: it never changes the envelope of a
    message with a payload."""

    line: Chunk
    at: int


def encode_parts(messages: Sequence[Message | Encoded]) -> list[Chunk]:
    """Encode ``messages`` a line each, as chunks to send in a row: a message encoded by its sender
    is taken as it is, and so is the line of a decoded one with a payload (:class:`Raw`): its
    payload is never decoded nor encoded again. A line of 16 kB or more is a chunk of its own,
    not copied. Raises :class:`InvalidMessage` for non-JSON content."""
    parts: list[Chunk] = []
    pieces: list[Chunk] = []  # joined into one chunk, a copy of small things
    for m in messages:
        line: Chunk
        if isinstance(m, Encoded):
            line = m.data
        elif isinstance(raw := m.get(PAYLOAD), Raw):
            line = raw.line  # decoded here: forwarded as it came, envelope and payload
        else:
            try:
                line = _ENCODER.encode(m).encode()
            except (TypeError, ValueError, RecursionError) as exc:
                raise InvalidMessage(f"not JSON-serialisable: {exc}") from exc
        if pieces:
            pieces.append(_LINE)
        if len(line) < _OWN_CHUNK:
            pieces.append(line)
            continue
        parts += (b"".join(pieces), line)
        pieces = [b""]  # the next line's separator follows
    if pieces or not parts:
        parts.append(b"".join(pieces))
    return parts


def encode(messages: Sequence[Message | Encoded]) -> bytes:
    """Encode a batch for the wire (see :func:`encode_parts`)."""
    return b"".join(encode_parts(messages))


def decode(body: Any, start: int = 0, end: int | None = None, routed: bool = True) -> list[Message]:
    """Decode a batch (a broker message's body, or a frame of a keyed process's pipe:
    ``body[start:end]``); never raises. Only envelopes are decoded: a payload is left in
    the message (field :data:`PAYLOAD`) as a :class:`Raw`, for :func:`payload`.
    ``routed``: casts, calls and stops lacking what routing them needs are dropped too (a
    keyed process takes what its worker routed to it as it is).

    A message that cannot be decoded (forged, or from a broken sender) is dropped and logged on
    its own: the others of its batch are handled. A Celery event (one JSON object) is one message."""
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    elif isinstance(body, memoryview):
        body = body.tobytes()
    elif isinstance(body, dict):  # decoded already (a Celery event)
        return [body]
    if not isinstance(body, (bytes, bytearray)):
        logger.warning("forseti: dropped a broker message that is no batch (%s)", type(body).__name__)
        return []
    end = len(body) if end is None else end
    view = memoryview(body)
    batch = _decode_together(body, start, end, view, routed)
    if batch is not None:
        return batch
    batch = []
    dropped = 0
    while start < end:
        stop = body.find(_LINE, start, end)
        if stop < 0:
            stop = end
        if stop > start:
            tab = body.find(_TAB, start, stop)
            try:
                m = _loads(body[start:stop if tab < 0 else tab])
            except (ValueError, RecursionError):
                m = None
            if type(m) is dict and (not routed or _well_formed(m, tab >= 0)):
                if tab >= 0:
                    m[PAYLOAD] = Raw(view[start:stop], tab + 1 - start)
                batch.append(m)
            else:
                dropped += 1
        start = stop + 1
    if dropped:
        logger.warning("forseti: dropped %d undecodable or malformed messages of a batch of %d",
                       dropped, dropped + len(batch))
    return batch


#: The JSON decoder's C scanner: ``(value, end)`` of the JSON text at an index (``json.loads`` less its
#: Python layers: encoding detection, whitespace regexes).
_SCAN: Any = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def decode_line(body: bytes | bytearray, start: int, end: int) -> Message | None:
    """The message alone on ``body[start:end]`` (a pipe's frame of one message), its payload
    decoded; ``None`` for anything else (more than one line, a large one, any text ``json.dumps``
    would not have written: whitespace, bad UTF-8, a payload that is no JSON), which
    :func:`decode` and :func:`decode_payloads` then take as they take every frame. A keyed
    process reads a frame of one call per call: this is its hot path."""
    if end - start >= _NO_GC_FROM or body.find(_LINE, start, end) >= 0:
        return None
    tab = body.find(_TAB, start, end)
    try:
        text = body[start:end if tab < 0 else tab].decode()
        m, at = _SCAN(text, 0)
        if type(m) is not dict or at != len(text):
            return None
        if tab >= 0:
            text = body[tab + 1:end].decode()
            value, at = _SCAN(text, 0)
            if at != len(text):
                return None
            m[PAYLOAD] = value
    except (ValueError, StopIteration, RecursionError):
        return None
    return m


def _decode_together(body: bytes | bytearray, start: int, end: int, view: memoryview,
                     routed: bool) -> list[Message] | None:
    """The usual case, fast: every envelope of ``body[start:end]`` decoded by one ``json.loads``
    (a call per line costs 3 times as much); ``None`` if any line is not a well-formed envelope
    (then each is decoded on its own, to drop only what is bad)."""
    lines = body[start:end].split(_LINE)
    envelopes = []
    payloads: list[Raw | None] = []
    at = start
    for line in lines:
        tab = line.find(_TAB)
        if tab < 0:
            envelopes.append(line)
            payloads.append(None)
        else:
            envelopes.append(line[:tab])
            # A large line is a view of the body: what reaches a pipe or a broker is not a copy.
            payloads.append(Raw(line if len(line) < _OWN_CHUNK else view[at:at + len(line)], tab + 1))
        at += len(line) + 1
    try:
        decoded = _loads(b"[" + b",".join(envelopes) + b"]")
    except (ValueError, RecursionError):
        return None
    if len(decoded) != len(lines):
        return None
    for m, raw in zip(decoded, payloads, strict=True):
        if type(m) is not dict or (routed and not _well_formed(m, raw is not None)):
            return None
        if raw is not None:
            m[PAYLOAD] = raw
    return decoded  # type: ignore[no-any-return]


def decode_payloads(batch: list[Message]) -> None:
    """Decode the payloads of ``batch`` in place (one ``json.loads`` for all when it can: a keyed
    process takes many small casts at a time); a payload that is no JSON becomes the
    :class:`InvalidMessage` saying why."""
    raws = [m for m in batch if isinstance(m.get(PAYLOAD), Raw)]
    if len(raws) > 1:
        try:
            values = _loads(b"[" + b",".join(m[PAYLOAD].line[m[PAYLOAD].at:] for m in raws) + b"]")
        except (ValueError, RecursionError):
            values = None
        if values is not None and len(values) == len(raws):
            for m, value in zip(raws, values, strict=True):
                m[PAYLOAD] = value
            return
    for m in raws:
        try:
            m[PAYLOAD] = payload(m)
        except InvalidMessage as exc:
            m[PAYLOAD] = exc


def payload(msg: Message) -> Any:
    """The payload of a decoded message (field :data:`PAYLOAD`), decoded: raises
    :class:`InvalidMessage` if it is not JSON (only a forger or a broken sender writes that)."""
    return decode_payload(msg[PAYLOAD], msg.get("t"))


def decode_payload(raw: Any, kind: Any) -> Any:
    """The payload ``raw`` of a decoded message of type ``kind`` (a typed message's
    ``payload``), decoded as :func:`payload` does."""
    if not isinstance(raw, Raw):
        return raw  # in the envelope (a message made here, never encoded)
    try:
        return _loads(bytes(raw.line[raw.at:]))
    except RecursionError:
        raise InvalidMessage(f"{kind} payload is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise InvalidMessage(f"{kind} payload is not JSON: {exc}") from None


def _loads(data: bytes | bytearray) -> Any:
    if len(data) < _NO_GC_FROM or not gc.isenabled():
        return json.loads(data)
    # Decoding makes a container per JSON list or object: a large text of small ones would set
    # off the collector many times over (5 times slower for a megabyte of "[[],[],...]"). What
    # JSON decodes holds no cycle: nothing is left for it to find.
    gc.disable()
    try:
        return json.loads(data)
    finally:
        gc.enable()


#: Text fields each type of message a client may send needs (anyone who can write to the broker
#: can send these: a worker's own messages are checked by their signature, see ``signing``).
_TEXT_FIELDS: dict[str, tuple[str, ...]] = {
    CAST: ("n", "k"), CALL: ("n", "k", "r", "c"), STOP: ("n", "k"),
    GET: ("n", "k", "r", "c"), SEARCH: ("n", "k", "r", "c"), STOP_KEY: ("n", "k", "r", "c", "node"),
    METRICS: ("r", "c"),
}
_WITH_PAYLOAD = frozenset({CAST, CALL})


def _well_formed(m: Message, payload: bool) -> bool:
    """Whether the envelope ``m`` (``payload``: a payload follows it) has what its type needs, so
    that handling it cannot fail on its shape: a text ``t`` (or none, and a text ``type``: a Celery
    event); for what a client sends, the text fields its handler reads, a finite deadline ``d``
    and, for a cast or call, its message; ``a`` of a ``get`` a list."""
    t = m.get("t")
    if type(t) is not str:
        return t is None and type(m.get("type")) is str  # a Celery event (a client's cache hears them)
    needs = _TEXT_FIELDS.get(t)
    if needs is None:
        return True
    d = m.get("d")
    return (all(type(m.get(f)) is str for f in needs)
            and (d is None or (type(d) in (int, float) and math.isfinite(d)))
            and (t not in _WITH_PAYLOAD or payload or PAYLOAD in m)
            and type(m.get("a", [])) is list)
