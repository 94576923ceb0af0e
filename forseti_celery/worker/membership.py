"""Which workers are alive: every worker hears every heartbeat (a fanout), so a
worker that becomes leader already knows whom to ask for their registries.

A hostname belongs to one incarnation (one worker process) at a time: a heartbeat naming a live
member's hostname with another incarnation (a second worker started with the same ``-n``, or a
forged heartbeat) is not believed until the member has been silent for ``node_timeout`` or said
goodbye, so it frees none of the member's keys."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Member", "Members"]


@dataclass
class Member:
    """What the last heartbeat of one worker said."""

    hostname: str
    incarnation: str
    eligible: bool
    names: frozenset[str]
    last_seen: float = field(default_factory=time.monotonic)
    leader: bool = False
    epoch: int = 0


class Members:
    """Live workers by hostname, expired after ``node_timeout`` seconds of silence."""

    def __init__(self, node_timeout: float) -> None:
        self.node_timeout = node_timeout
        self._members: dict[str, Member] = {}
        #: The latest heartbeat of another incarnation of a live member's hostname: it becomes the
        #: member the moment the live one times out or says goodbye (a worker restarted at once).
        self._successors: dict[str, Member] = {}

    def __iter__(self) -> Iterator[Member]:
        return iter(list(self._members.values()))

    def __contains__(self, hostname: object) -> bool:
        return hostname in self._members

    def get(self, hostname: str) -> Member | None:
        """The member called ``hostname``, if alive."""
        return self._members.get(hostname)

    def heard(self, hb: dict[str, Any]) -> Member | None:
        """Record a heartbeat and return its member; None (nothing recorded) when it names a live
        member's hostname with another incarnation: that member lives on until it times out."""
        host = hb["node"]
        old = self._members.get(host)
        member = Member(host, hb["inc"], bool(hb["eligible"]), frozenset(hb["names"]),
                        leader=bool(hb.get("leader")), epoch=int(hb.get("epoch", 0)))
        if old is not None and old.incarnation != hb["inc"]:
            self._successors[host] = member
            return None
        self._members[host] = member
        return member

    def _succeed(self, hostname: str, now: float) -> None:
        successor = self._successors.pop(hostname, None)
        if successor is not None and now - successor.last_seen <= self.node_timeout:
            self._members[hostname] = successor

    def exclude(self, hostname: str) -> None:
        """Place nothing on ``hostname`` until its next heartbeat says otherwise (it refused a start)."""
        member = self._members.get(hostname)
        if member is not None:
            member.eligible = False

    def remove(self, hostname: str, incarnation: str | None = None) -> Member | None:
        """Forget a worker (it said goodbye, or was declared dead); with ``incarnation``, only
        that incarnation of it (a goodbye names its own)."""
        member = self._members.get(hostname)
        if member is None or incarnation not in (None, member.incarnation):
            return None
        del self._members[hostname]
        self._succeed(hostname, time.monotonic())
        return member

    def refresh(self) -> None:
        """Restart every member's timeout (after we were cut off and could not hear them)."""
        now = time.monotonic()
        for m in self._members.values():
            m.last_seen = now

    def expire(self, now: float | None = None) -> list[Member]:
        """Remove and return the workers silent for longer than ``node_timeout`` (a successor
        heard meanwhile takes the hostname's place at once)."""
        now = time.monotonic() if now is None else now
        dead = [m for m in self._members.values() if now - m.last_seen > self.node_timeout]
        for m in dead:
            del self._members[m.hostname]
            self._succeed(m.hostname, now)
        return dead
