"""The client's async side: ``await``-able ``get_key``, ``call`` … on any running event loop.

Native, no thread per request: each operation is the sync client's own steps
(:mod:`.requests`), its requests awaited here instead of waited for.

* **Answers** reach the awaiting loop from the client's one consumer thread: it hands
  each answer to its waiter's :class:`_LoopSide`, which wakes the loop once per burst
  (one ``call_soon_threadsafe`` for every answer that arrived before the loop ran it).
  While the consumer's work is free (a sync caller just read its own answer and gave it back)
  the loop reads its answers itself instead, without waiting (:mod:`.loop_reads`): no thread
  woken, as for a sync caller. Whoever reads hands an answer over; on the loop it settles
  its waiter at once.
* **Publishing** happens on the loop, inline: the requests of one loop iteration are
  held and, at its end, published grouped by destination, one broker message per
  destination, after what the client's :class:`~forseti_celery.core.broker.Batcher` had
  queued before (asend, other threads); on Redis all destinations in one round trip
  (``Publisher.publish_many``); a request made while none of the loop's is held or awaits an
  answer goes at once, in its task's step (a loop iteration sooner). A flush blocks the loop
  for that round trip (measured on this loaded 2-core machine: ~0.3-0.6 ms with one request,
  a few ms with 300); a broker that is away blocks it up to the publisher's bounded reconnect
  (~2 s), then every request of the flush fails with
  :class:`~forseti_celery.BrokerUnavailable`. The first request of a client also declares
  its reply queue and starts its consumer thread, as a sync one does.
* **Cancellation** (``task.cancel()``, ``asyncio.timeout``, a client disconnect) runs the
  steps' ``finally``: the waiter leaves the client's table, its timer is cancelled, the
  route of a key-addressed call is settled. A request already held or published still
  goes (like a sync call that timed out); its late answer finds no waiter and is dropped.
  Later messages keep their order: nothing is taken out of the batcher's queue.

One :class:`AsyncClient` per :class:`~forseti_celery.client.client.Client` (so a forked child,
which gets a fresh client, gets a fresh one), one :class:`_LoopSide` per event loop using it
(per thread: a thread runs one loop at a time).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from celery.utils.log import get_logger

from ..core.codec import Encoded, Message
from ..core.keyref import KeyRef
from .client import Client
from .loop_reads import LoopReads
from .requests import Ask, Steps, T, answer_of

__all__ = ["AsyncClient", "AsyncPending"]

logger = get_logger(__name__)


class AsyncPending:
    """A task awaiting the answer to one request, on ``side``'s loop."""

    __slots__ = ("error", "future", "reply", "side")

    def __init__(self, side: _LoopSide) -> None:
        self.side = side
        #: What the task awaits now: done when the answer came, the request failed or a timer ran out.
        self.future: asyncio.Future[None] | None = None
        self.reply: Message | None = None
        self.error: BaseException | None = None

    def deliver(self, reply: Message) -> None:
        """The answer came (called on the client's consumer thread)."""
        self.reply = reply
        self.side.wake(self)

    def fail(self, error: BaseException) -> None:
        """The request could not be sent (called on the loop)."""
        self.error = error
        _settle(self.future)


def _settle(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class _LoopSide:
    """One event loop's part of a client: its wake-ups and its flushes."""

    __slots__ = ("_client", "_held", "_lock", "_ready", "_sender", "_waking", "_will_flush", "loop", "reads")

    def __init__(self, loop: asyncio.AbstractEventLoop, client: Client) -> None:
        self.loop = loop
        self._client = client
        self._sender = client._sender
        self._lock = threading.Lock()
        self._ready: list[AsyncPending] = []  #: answered, for the loop to wake (under _lock)
        self._waking = False  #: a wake-up is scheduled on the loop (under _lock)
        #: Requests held since the last flush (loop only).
        self._held: list[tuple[str, Encoded, AsyncPending]] = []
        self._will_flush = False  #: a flush is scheduled (loop only)
        #: The loop's reads of its own answers while the consumer's work is free (loop only).
        self.reads = LoopReads(loop)

    def wake(self, pending: AsyncPending) -> None:
        """Hand ``pending``'s answer to the loop: settled at once when read on the loop itself
        (:mod:`.loop_reads`, or a sync call made on it), else one wake-up per burst."""
        if asyncio._get_running_loop() is self.loop:
            _settle(pending.future)
            return
        with self._lock:
            self._ready.append(pending)
            if self._waking:
                return
            self._waking = True
        try:
            self.loop.call_soon_threadsafe(self._woken)
        except RuntimeError:  # the loop is closed: nobody awaits on it any more
            with self._lock:
                self._ready.clear()
                self._waking = False

    def _woken(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
            self._waking = False
        for pending in ready:
            _settle(pending.future)

    def send(self, routing_key: str, encoded: Encoded, pending: AsyncPending) -> None:
        """Send ``encoded`` at the end of this loop iteration, with every other request held by
        then; at once if it is the loop's only request (none held, none awaiting an answer): a
        loop iteration less on its way (issue 15, row 17c), and nothing to group it with yet."""
        if not self._held and not self.reads.busy:
            self._held.append((routing_key, encoded, pending))
            self._flush()
            return
        self._held.append((routing_key, encoded, pending))
        if not self._will_flush:
            self._will_flush = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._will_flush = False
        held, self._held = self._held, []
        # One broker message per destination (of at most max_bytes and Batcher.max_batch): grouped
        # by routing key, each group in the order held. Only requests of different tasks are
        # reordered: a task holds one request per iteration (it awaits each).
        groups: dict[str, list[Encoded]] = {}
        for routing_key, encoded, _ in held:
            groups.setdefault(routing_key, []).append(encoded)
        sender, batches = self._sender, []
        for routing_key, group in groups.items():
            chunk: list[Message | Encoded] = []
            size = 0
            for encoded in group:
                size += len(encoded.data) + 2
                if chunk and (size > sender.max_bytes or len(chunk) == sender.max_batch):
                    batches.append((routing_key, chunk))
                    chunk, size = [], len(encoded.data) + 2
                chunk.append(encoded)
            batches.append((routing_key, chunk))
        try:
            sender.flush()  # what this client queued before (asend, other threads), first
            self._publish_many(batches)  # on Redis in one round trip
        except Exception as exc:  # BrokerUnavailable (the messages are lost): their requests fail
            for _, _, pending in held:
                pending.fail(exc)

    def _publish_many(self, batches: list[tuple[str, list[Message | Encoded]]]) -> None:
        """Each ``(routing_key, messages)`` as one broker message: those to workers in one round
        trip on Redis (Publisher.publish_many), the leader's each with its expiration."""
        client = self._client
        client._start()
        leader = client.names.leader
        client._publisher.publish_many(client.names.exchange, [b for b in batches if b[0] != leader])
        for routing_key, msgs in batches:
            if routing_key == leader:
                client._publish(routing_key, msgs)


class AsyncClient:
    """The async operations of ``client`` (the methods of the sync client, ``a``-named)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        #: This thread's loop's side: a thread runs one loop at a time (and uvloop's loops take
        #: no weak references, so no WeakKeyDictionary by loop).
        self._local = threading.local()

    async def run(self, steps: Steps[T]) -> T:
        """Run one operation's steps on the running loop, awaiting each answer."""
        go: Any = steps.send
        result: Any = None
        while True:
            try:
                ask = go(result)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            finally:
                result = None  # an error thrown in, kept here, would keep its traceback's frames
            try:
                result, go = await self._request(ask), steps.send
            except BaseException as exc:  # cancellation too: the steps' finally runs
                result, go = exc, steps.throw

    def _side(self, loop: asyncio.AbstractEventLoop) -> _LoopSide:
        side: _LoopSide | None = getattr(self._local, "side", None)
        if side is None or side.loop is not loop:
            if side is not None:  # this thread runs another loop now: the last one's dup closed
                side.reads.close()
            side = self._local.side = _LoopSide(loop, self.client)
        return side

    async def _request(self, ask: Ask) -> Any:
        """Send ``ask`` and await its answer (no thread: the consumer thread wakes this loop)."""
        client = self.client
        encoded = client.encode(ask)
        client._start()
        loop = asyncio.get_running_loop()
        side = self._side(loop)
        corr = ask.msg.corr
        pending = AsyncPending(side)
        client.pending[corr] = pending
        deadline = loop.time() + ask.timeout
        interval = client.settings.retry_interval
        reads = side.reads
        try:
            side.send(ask.routing_key, encoded, pending)
            if not reads.awaiting(client._loop):  # this loop cannot read its answer: the reply thread
                client._loop.call_back()
            while True:
                if pending.error is not None:  # not sent (a flush at once fails before anything awaits)
                    raise pending.error
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise client.timed_out(ask)
                future = pending.future = loop.create_future()
                timer = loop.call_later(min(remaining, interval) if ask.resend else remaining, _settle, future)
                try:
                    await future
                finally:
                    timer.cancel()
                if pending.reply is not None:
                    break
                if pending.error is not None:
                    raise pending.error
                if ask.resend:
                    side.send(ask.routing_key, encoded, pending)
        finally:
            pending.future = None
            del client.pending[corr]
            reads.answered()
        return answer_of(pending.reply)

    # -- the operations (each returns the coroutine of its steps: no frame of its own in flight) --
    def get_key(self, key: str, args: Any, name: str, timeout: float | None) -> Coroutine[Any, Any, KeyRef]:
        """:meth:`Client.get_key`, awaited."""
        return self.run(self.client.get_key_steps(key, args, name, timeout))

    def search_key(self, key: str, name: str, timeout: float | None) -> Coroutine[Any, Any, KeyRef | None]:
        """:meth:`Client.search_key`, awaited."""
        return self.run(self.client.search_key_steps(key, name, timeout))

    def get_metrics(self, timeout: float | None) -> Coroutine[Any, Any, dict[str, int]]:
        """:meth:`Client.get_metrics`, awaited."""
        return self.run(self.client.get_metrics_steps(timeout))

    async def get_less_used_node(self, timeout: float | None) -> str:
        """:meth:`Client.get_less_used_node`, awaited."""
        return self.client.less_used(await self.get_metrics(timeout))

    def call(self, ref: KeyRef, msg: Any, timeout: float | None) -> Coroutine[Any, Any, Any]:
        """:meth:`Client.call` (``ref.acall``), awaited."""
        return self.run(self.client.call_steps(ref, msg, timeout))

    async def cast(self, ref: KeyRef, msg: Any) -> None:
        """:meth:`Client.cast` (``ref.asend``): queued, in order with this client's other messages."""
        self.client.cast(ref, msg)

    def stop(self, ref: KeyRef, timeout: float | None) -> Coroutine[Any, Any, None]:
        """:meth:`Client.stop` (``ref.astop``), awaited."""
        return self.run(self.client.stop_steps(ref, timeout))

    def call_key(self, key: str, msg: Any, args: Any, name: str, timeout: float | None) -> Coroutine[Any, Any, Any]:
        """:meth:`Client.call_key` (``forseti_celery.acall``), awaited."""
        return self.run(self.client.call_key_steps(key, msg, args, name, timeout))

    def cast_key(self, key: str, msg: Any, args: Any, name: str,
                 timeout: float | None = None) -> Coroutine[Any, Any, None]:
        """:meth:`Client.cast_key` (``forseti_celery.asend``), awaited."""
        return self.run(self.client.cast_key_steps(key, msg, args, name, timeout))

    def waiting(self) -> int:
        """How many requests of this client's tasks await an answer (tests: nothing leaks)."""
        return sum(isinstance(p, AsyncPending) for p in list(self.client.pending.values()))
