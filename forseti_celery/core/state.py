"""Checkpoints: the last stored ``snapshot()`` of each movable keyed process, in Redis at
``forseti_state_url``, fenced so that only the key's newest incarnation may write it.

One Redis hash per ``(namespace, name, key)`` (:func:`~.names.state_key`) holds ``s``, the state
as JSON; ``v``, its version (per key, monotonic: every claim and write adds one); ``e`` and ``o``,
the epoch and spawn id (``sid``) of the incarnation that owns it: its *token*, from the leader's
spawn order. Every change is one Lua script (:data:`_SCRIPT`), a compare-and-set:

* ``claim`` (a process starts): refused if the stored epoch is newer than the claimant's (a spawn
  of a deposed leader that arrived late; an epoch of 0, unknown, is never refused); else the
  claimant becomes the owner, and the stored state (if any) is returned, to restore from. From
  then on the previous incarnation is stale.
* ``write`` (a checkpoint) and ``delete`` (``stop()``): only by the owner (its ``sid``, unique
  per incarnation). A stale incarnation
  (partitioned, or resumed after SIGSTOP once its key started elsewhere) is refused, even before
  the new one wrote anything; a deleted key is never brought back by a stale writer.

The keyed process talks to Redis itself (one lazy connection, only when ``forseti_state_url`` is
set): a large state never passes through its worker.
"""

from __future__ import annotations

import json
from typing import Any

import redis
import redis.exceptions

from .errors import StateUnavailable
from .names import state_key

__all__ = ["Checkpoints", "StateUnavailable", "Token"]

#: An incarnation's token: the leader's epoch and the spawn's id (``sid``).
Token = tuple[int, str]

# KEYS[1] the checkpoint; ARGV: op (claim | write | delete), epoch, sid, state (write only).
# Answers {1, version[, state]} when done, {0, version} when refused (stale).
_SCRIPT = """
local op, epoch, sid = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local cur = redis.call('HMGET', KEYS[1], 'e', 'o', 'v')
local ce, co, cv = tonumber(cur[1]), cur[2], tonumber(cur[3]) or 0
if op == 'claim' then
  if ce and epoch > 0 and ce > epoch then return {0, cv} end
  redis.call('HSET', KEYS[1], 'e', math.max(ce or 0, epoch), 'o', sid, 'v', cv + 1)
  local s = redis.call('HGET', KEYS[1], 's')
  if s then return {1, cv + 1, s} end
  return {1, cv + 1}
end
if co ~= sid then return {0, cv} end
if op == 'write' then
  redis.call('HSET', KEYS[1], 's', ARGV[4], 'v', cv + 1)
  return {1, cv + 1}
end
redis.call('DEL', KEYS[1])
return {1, cv}
"""

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


class Checkpoints:
    """The checkpoint store of one namespace at ``url`` (a Redis URL). Connects on first use;
    every method raises :class:`StateUnavailable` when Redis fails."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self._client: Any = None
        self._script: Any = None

    def _connect(self) -> Any:
        if self._client is None:
            self._client = redis.Redis.from_url(self.url, socket_timeout=10, socket_connect_timeout=5)
            self._script = self._client.register_script(_SCRIPT)
        return self._client

    def _run(self, name: str, key: str, *args: Any) -> list[Any]:
        try:
            self._connect()
            return list(self._script(keys=[state_key(self.namespace, name, key)], args=list(args)))
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StateUnavailable(f"checkpoint store {self.url}: {exc}") from exc

    def claim(self, name: str, key: str, token: Token) -> tuple[bool, Any]:
        """Make ``token`` the key's owner: ``(True, stored state or None)``; ``(False, None)``
        when a newer epoch owns it."""
        answer = self._run(name, key, "claim", token[0], token[1])
        if not answer[0]:
            return False, None
        return True, json.loads(answer[2]) if len(answer) > 2 else None

    def write(self, name: str, key: str, token: Token, state: Any) -> bool:
        """Store ``state`` (JSON-able) if ``token`` owns the key; False if refused (stale).
        Raises :class:`TypeError`/:class:`ValueError` if ``state`` is no JSON."""
        return self.write_json(name, key, token, _ENCODER.encode(state))

    def write_json(self, name: str, key: str, token: Token, data: str | bytes) -> bool:
        """:meth:`write` of a state encoded already."""
        return bool(self._run(name, key, "write", token[0], token[1], data)[0])

    def delete(self, name: str, key: str, token: Token) -> bool:
        """Delete the key's checkpoint if ``token`` owns it; False if refused (stale)."""
        return bool(self._run(name, key, "delete", token[0], token[1])[0])

    def read(self, name: str, key: str) -> dict[str, Any] | None:
        """What is stored for the key, ``{"state", "version", "epoch", "sid"}``, or ``None``
        (for tests and inspection: a process restores through :meth:`claim`)."""
        try:
            got = self._connect().hgetall(state_key(self.namespace, name, key))
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StateUnavailable(f"checkpoint store {self.url}: {exc}") from exc
        if not got:
            return None
        s = got.get(b"s")
        return {"state": None if s is None else json.loads(s), "version": int(got.get(b"v", 0)),
                "epoch": int(got.get(b"e", 0)), "sid": got.get(b"o", b"").decode()}

    def close(self) -> None:
        """Drop the connection (a new one is made on next use)."""
        if self._client is not None:
            self._client.close()
        self._client = self._script = None
