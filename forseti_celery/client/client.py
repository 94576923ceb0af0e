"""The client: ``get_key``, ``search_key``, metrics, a KeyRef's ``call``/``send``/``stop``, and
the key-addressed ``forseti_celery.call``/``send`` (their routes: :mod:`.routes`).

One :class:`Client` per process and app (made again after a fork), safe to use
from many threads. It publishes on a connection of its own and receives every
answer on a private reply queue through one consumer thread. Requests to the
leader are re-sent while unanswered (with the same correlation id, so answering
twice is harmless): a request held by a leader that dies is served by the next.
"""

from __future__ import annotations

import atexit
import itertools
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from celery.utils.log import get_logger
from kombu import Queue

from ..core.broker import Batcher, Publisher, RestartIntensity
from ..core.codec import Encoded, Message, check_json, encode_call, encode_cast, encode_message
from ..core.consumer import ConsumerLoop
from ..core.errors import BrokerUnavailable, ForsetiError, ForsetiTimeout, InvalidMessage, ProcessGone, RemoteError
from ..core.keyref import KeyRef
from ..core.messages import MOVED, NO_VALUE, TYPE, Call, Cast, Followed, Get, Metrics, Moved, Reply, Search, StopKey
from ..core.names import EVENT_EXITED, EVENT_LEADER, EVENT_NODE_LOST
from .cache import RefCache
from .requests import Ask, Pending, Steps, Waiter, answer_of, check_key, check_ref, drive, timeout_of
from .routes import Route, RouteTable

if TYPE_CHECKING:
    from ..core.installs import Installed

__all__ = ["Client"]

logger = get_logger(__name__)

T = TypeVar("T")


class Client:
    """Talks to the leader and to keyed processes through the broker."""

    def __init__(self, forseti: Installed) -> None:
        self.forseti = forseti
        self.settings = forseti.settings
        self.names = forseti.names
        self.id = uuid.uuid4().hex
        self._corrs = itertools.count()
        self._reply_queue = self.names.reply_queue(self.id)
        self._reply_rk = self._reply_queue.routing_key
        connection = forseti.app.connection_for_write()
        self._broker = connection.as_uri()  # for error messages: kombu masks the password
        self._publisher = Publisher(connection, keep=self.names.queue_ttl)
        self._max_size = self.settings.max_message_size
        self._sender = Batcher(self._publish, max_bytes=self._max_size)
        atexit.register(self._flush_quietly)
        #: Who waits for the answer to each request, by correlation id (sync callers'
        #: :class:`Pending`, or the async side's): the consumer thread delivers it to them.
        self.pending: dict[str, Waiter] = {}
        self._start_lock = threading.Lock()
        self._cache = RefCache(self.settings.cache)
        self._routes = RouteTable()
        # Exit and node-lost events, cache or not: the routes of key-addressed messages need them
        # (a route to a worker that left must be dropped; no notice comes for a key sent nothing
        # while it moved).
        self._exits_queue = self.names.exits_queue(self.id, forseti.app)
        self._loop = self._new_loop()
        self._closed = False
        self._declared = False  # the client's queues, for the reply thread running (ensure_started)

    def _new_loop(self) -> ConsumerLoop:
        return ConsumerLoop(
            "forseti-client", self.forseti.app.connection_for_read, self._queues, self._on_replies,
            intensity=RestartIntensity(self.settings.max_retries, self.settings.max_time),
            on_connect=lambda: self._subscribed(True), on_disconnect=lambda: self._subscribed(False),
            busy=lambda: len(self.pending) > 1,  # a sync caller drives it (_request): others wait too
            awaited=lambda: any(w.reply is None for w in list(self.pending.values())),
        )

    def _subscribed(self, ready: bool) -> None:
        # Exit and node-lost events were (or will be) unheard: a route may lead to a dead worker.
        self._cache.subscribed(ready)
        self._routes.clear()

    def _queues(self) -> list[Queue]:
        return [self._reply_queue, self._exits_queue]

    # -- each operation is written once, as steps (see .requests): run here, awaited by .aio ----
    def run(self, steps: Steps[T]) -> T:
        """Run one operation's steps, waiting on this thread for each answer."""
        return drive(steps, self._request)

    # -- leader requests ----------------------------------------------------------------------
    def get_key(self, key: str, args: Any, name: str, timeout: float | None) -> KeyRef:
        """The live process for ``(name, key)``, created on the least-used worker if absent."""
        return self.run(self.get_key_steps(key, args, name, timeout))

    def get_key_steps(self, key: str, args: Any, name: str, timeout: float | None) -> Steps[KeyRef]:
        """:meth:`get_key`'s steps."""
        # Checked before the cache is asked, so a hit refuses what a miss refuses (and an
        # unhashable key is InvalidKey, not a TypeError of the cache's dict).
        check_key(key, name, self.settings.max_key_length)
        t = timeout_of(timeout, self.settings.timeout)
        if args:
            args = list(args)
            check_json(args, "args", self._max_size)
        cached, asked = self._cache.lookup(name, key)
        if cached is not None:
            return cached
        node, pid = yield Ask(self.names.leader, Get(name, key, list(args), *self._ticket(t)), t,
                              resend=True, what="args")
        ref = KeyRef(node, pid, key, name, self.names.namespace, self.forseti.app)
        self._cache.put(ref, asked)
        return ref

    def search_key(self, key: str, name: str, timeout: float | None) -> KeyRef | None:
        """The live process for ``(name, key)`` or ``None``; never creates one."""
        return self.run(self.search_key_steps(key, name, timeout))

    def search_key_steps(self, key: str, name: str, timeout: float | None) -> Steps[KeyRef | None]:
        """:meth:`search_key`'s steps."""
        check_key(key, name, self.settings.max_key_length)
        t = timeout_of(timeout, self.settings.timeout)
        asked = self._cache.epoch()
        found = yield Ask(self.names.leader, Search(name, key, *self._ticket(t)), t, resend=True)
        ref = None if found is None else KeyRef(found[0], found[1], key, name, self.names.namespace, self.forseti.app)
        self._cache.found(name, key, ref, asked)
        return ref

    def get_metrics(self, timeout: float | None) -> dict[str, int]:
        """Live keyed processes per eligible live worker."""
        return self.run(self.get_metrics_steps(timeout))

    def get_metrics_steps(self, timeout: float | None) -> Steps[dict[str, int]]:
        """:meth:`get_metrics`'s steps."""
        t = timeout_of(timeout, self.settings.timeout)
        return dict((yield Ask(self.names.leader, Metrics(*self._ticket(t)), t, resend=True)))

    def get_less_used_node(self, timeout: float | None) -> str:
        """The eligible worker the next new key would be placed on (names aside)."""
        return self.less_used(self.get_metrics(timeout))

    @staticmethod
    def less_used(metrics: dict[str, int]) -> str:
        """The worker of ``metrics`` with the fewest processes (ties by hostname)."""
        if not metrics:
            raise ForsetiTimeout("no eligible live worker")
        return min(metrics, key=lambda host: (metrics[host], host))

    # -- keyed processes ------------------------------------------------------------------------
    def call(self, ref: KeyRef, msg: Any, timeout: float | None) -> Any:
        """``ref.call(msg)``; a call unanswered because the worker died is :class:`ProcessGone`."""
        return self.run(self.call_steps(ref, msg, timeout))

    def call_steps(self, ref: KeyRef, msg: Any, timeout: float | None) -> Steps[Any]:
        """:meth:`call`'s steps."""
        check_ref(ref, self.names.namespace)
        t = timeout_of(timeout, self.settings.call_timeout)
        try:
            return (yield Ask(self._node_rk(ref), Call(ref.name, ref.key, ref.pid, *self._ticket(t)), t,
                              resend=False, what="message", payload=msg))
        except (ProcessGone, RemoteError, ForsetiTimeout) as exc:
            yield from self._call_failed(ref, exc, t)

    def _call_failed(self, ref: KeyRef, exc: ForsetiError, timeout: float) -> Steps[NoReturn]:
        """Raise ``exc`` of a call to ``ref``: a timeout is :class:`ProcessGone` if the leader
        no longer lists ``ref`` (it ended meanwhile); an ended process leaves the cache."""
        if isinstance(exc, ForsetiTimeout):
            try:
                current = yield from self.search_key_steps(ref.key, ref.name, min(timeout, 2.0))
            except ForsetiTimeout:
                current = ref  # cannot tell: report the timeout
            if current == ref:
                raise exc
            exc = ProcessGone(f"keyed process {ref.key!r} on {ref.node} has exited")
        self._cache.forget(ref)
        raise exc from None

    def cast(self, ref: KeyRef, msg: Any) -> None:
        """``ref.send(msg)``: queued and published in batches by the sender thread, in order."""
        check_ref(ref, self.names.namespace)
        self._sender.put(self._node_rk(ref), encode_cast(ref.name, ref.key, ref.pid, msg, self._max_size))

    # -- key-addressed messages (forseti_celery.call/send) -------------------------------------
    def call_key(self, key: str, msg: Any, args: Any, name: str, timeout: float | None) -> Any:
        """``forseti_celery.call``: ``msg`` to ``(name, key)``'s process, created with ``args`` if
        there is none, within ``timeout`` seconds (default forseti_call_timeout), creation included."""
        return self.run(self.call_key_steps(key, msg, args, name, timeout))

    def call_key_steps(self, key: str, msg: Any, args: Any, name: str, timeout: float | None) -> Steps[Any]:
        """:meth:`call_key`'s steps."""
        args = self._key_args(key, name, args)
        t = timeout_of(timeout, self.settings.call_timeout)
        deadline = time.monotonic() + t
        while True:
            route, seq = yield from self._route(key, args, name, t, cast=False)
            ref = route.ref
            t = max(deadline - time.monotonic(), 0.001)  # what creating the process left
            call = Call(ref.name, ref.key, ref.pid, *self._ticket(t), NO_VALUE, True, args, seq)
            ended = settled = False
            try:
                answer = yield Ask(self._node_rk(ref), call, t, resend=False, what="message", payload=msg)
                settled = True
                return answer
            except ProcessGone:
                settled = True
                # Answered "gone" by a worker that does not hold key-addressed messages (an older
                # version): it never wrote the call to a process, so sending it again is safe.
                self._cache.forget(ref)
                self._routes.drop(ref)
                t = deadline - time.monotonic()
                if t <= 0:
                    raise
            except (RemoteError, ForsetiTimeout) as exc:
                ended = settled = isinstance(exc, RemoteError)
                yield from self._call_failed(ref, exc, t)
            finally:
                # A crash ends the route at once if nothing else is on it: no detour for the next.
                # A call given up unanswered (timed out, its task cancelled) may still be on its way.
                self._routes.answered(route, ended, settled)

    def cast_key(self, key: str, msg: Any, args: Any, name: str, timeout: float | None = None) -> None:
        """``forseti_celery.send``: ``msg`` to ``(name, key)``'s process, created with ``args``
        if there is none (waiting for that as ``get_key`` does), without waiting for it."""
        self.run(self.cast_key_steps(key, msg, args, name, timeout))

    def cast_key_steps(self, key: str, msg: Any, args: Any, name: str, timeout: float | None = None) -> Steps[None]:
        """:meth:`cast_key`'s steps."""
        args = self._key_args(key, name, args)
        route, seq = yield from self._route(key, args, name, timeout_of(timeout, self.settings.timeout), cast=True)
        ref = route.ref
        envelope = Cast.envelope(ref.name, ref.key, ref.pid, args, seq, self._reply_rk)
        self._sender.put(self._node_rk(ref), encode_message(envelope, "message", self._max_size, payload=msg))

    def _key_args(self, key: Any, name: Any, args: Any) -> list[Any]:
        """``args`` as the list a key-addressed message carries, checked with its key and name."""
        check_key(key, name, self.settings.max_key_length)
        if not args:
            return []
        checked = list(args)
        check_json(checked, "args", self._max_size)
        return checked

    def _route(self, key: str, args: list[Any], name: str, timeout: float, cast: bool) -> Steps[tuple[Route, int]]:
        """Where this client's next message to ``(name, key)`` goes, and its sequence number:
        the key's route, opened to the ref ``get_key`` gives (created on demand) if none."""
        while True:
            taken = self._routes.take(name, key, cast)
            if taken is not None:
                return taken
            self._routes.open((yield from self.get_key_steps(key, args, name, timeout)))

    def _moved(self, notice: Message) -> None:
        """A worker forwarded this client's messages for a key to its next incarnation."""
        try:
            m = Moved.from_wire(notice)
        except InvalidMessage as exc:
            logger.debug("forseti: a malformed moved notice skipped: %s", exc)
            return
        ref = KeyRef(m.new_node, m.new_pid, m.key, m.name, self.names.namespace, self.forseti.app)
        if self._routes.moved(m.name, m.key, m.node, m.pid, ref, m.seq):
            self._cache.put(ref)
        route = self._routes.get(m.name, m.key)
        if route is None or (route.ref.node, route.ref.pid) != (m.node, m.pid):
            # Nothing more goes to the old process: its worker, if leaving, need not wait for us.
            followed = Followed(m.name, m.key, m.pid, self._reply_rk).to_wire()
            self._sender.put(self.names.node_routing_key(m.node), followed)

    def stop(self, ref: KeyRef, timeout: float | None) -> None:
        """``ref.stop()``: returns once the process has exited and the leader has freed its key."""
        self.run(self.stop_steps(ref, timeout))

    def stop_steps(self, ref: KeyRef, timeout: float | None) -> Steps[None]:
        """:meth:`stop`'s steps."""
        check_ref(ref, self.names.namespace)
        t = timeout_of(timeout, self.settings.call_timeout)
        grace = min(self.settings.stop_timeout, t * 0.8)
        self._cache.forget(ref)
        yield Ask(self.names.leader, StopKey(ref.name, ref.key, ref.pid, ref.node, "stop", grace,
                                             *self._ticket(t)), t, resend=True)

    # -- plumbing -------------------------------------------------------------------------------
    def _ticket(self, timeout: float) -> tuple[str, str, float]:
        """A new request's reply queue, correlation id and deadline (``timeout`` from now)."""
        # Unique per reply queue (all a leader or worker keys an answer by): a counter, cheaper
        # than a uuid4 for each of 10k calls/s, behind 8 random hex digits (a later client's).
        return self._reply_rk, f"{self.id[:8]}{next(self._corrs):x}", time.time() + timeout

    def encode(self, ask: Ask) -> Encoded:
        """``ask``'s message and payload, encoded once and checked (:class:`InvalidMessage` names
        ``ask.what``)."""
        msg = ask.msg
        if type(msg) is Call:
            return encode_call(msg, ask.what, self._max_size, ask.payload)
        return encode_message(msg.to_wire(), ask.what, self._max_size, deadline=msg.deadline, payload=ask.payload)

    def _request(self, ask: Ask) -> Any:
        """Send ``ask`` and wait for its answer, decoded here (on the caller's thread)."""
        encoded = self.encode(ask)
        self._start()
        corr, routing_key, timeout, resend = ask.msg.corr, ask.routing_key, ask.timeout, ask.resend
        pending = self.pending[corr] = Pending()
        deadline = time.monotonic() + timeout
        try:
            self._sender.send(routing_key, encoded)  # behind what this client queued before
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise self.timed_out(ask)
                until = min(deadline, now + self.settings.retry_interval) if resend else deadline
                self._loop.drive(pending.answered, until)  # reads the answer here if it can (issue 15)
                if pending.wait(max(0.0, until - time.monotonic())):
                    break
                if resend:
                    self._sender.send(routing_key, encoded)
        finally:
            del self.pending[corr]
        assert pending.reply is not None
        return answer_of(pending.reply)

    def timed_out(self, ask: Ask) -> ForsetiTimeout:
        """The error of ``ask`` unanswered within its timeout."""
        kind, timeout = ask.msg.T, ask.timeout
        if ask.routing_key != self.names.leader:
            return ForsetiTimeout(f"no answer to {kind!r} within {timeout:g} s")
        return ForsetiTimeout(f"no leader answered {kind!r} within {timeout:g} s in namespace "
                              f"{self.names.namespace!r} on {self._broker} (is a worker with forseti running there?)")

    def _publish(self, routing_key: str, msgs: list[Message | Encoded]) -> None:
        self._start()
        if routing_key != self.names.leader:
            self._publisher.publish(self.names.exchange, routing_key, msgs)
            return
        # Requests unanswered by their deadline leave the leader queue with it, so a namespace
        # nobody serves does not collect them forever.
        expiration = max(0.001, max(m.deadline or 0.0 for m in msgs if isinstance(m, Encoded)) - time.time())
        self._publisher.publish(self.names.exchange, routing_key, msgs, declare=[self.names.leader_queue],
                                expiration=expiration)

    def _flush_quietly(self) -> None:
        try:
            self._sender.flush()
        except Exception:  # at exit: nothing left to tell
            pass

    def _on_replies(self, batch: list[Message]) -> None:
        for reply in batch:
            if TYPE not in reply:  # a Celery event (on Redis every event of the cluster arrives here)
                kind = reply.get("type")
                if reply.get("namespace") != self.names.namespace:
                    continue
                if kind == EVENT_EXITED:
                    self._cache.exited(reply["name"], reply["key"], reply["hostname"], reply["child_pid"])
                    self._routes.exited(reply["name"], reply["key"], reply["hostname"], reply["child_pid"])
                elif kind == EVENT_NODE_LOST:
                    self._cache.node_lost(reply["node"])
                    self._routes.node_lost(reply["node"])
                elif kind == EVENT_LEADER:
                    self._cache.clear()
                    self._routes.clear()
                continue
            if reply[TYPE] == MOVED:
                self._moved(reply)
                continue
            pending = self.pending.get(Reply.corr_of(reply))
            if pending is not None:
                pending.deliver(reply)
                if type(pending) is Pending:  # a sync caller: its next request may read for itself
                    self._loop.answered()

    def ensure_started(self) -> None:
        """:meth:`_start`, and the consumer work handed back to the reply thread at once (its
        connections made and reading before the first request; :mod:`.aio` starts the client
        itself and calls the thread back only when its loop cannot read its own answer)."""
        self._start()
        self._loop.call_back()

    def _start(self) -> None:
        """Start the reply thread, or a new one after the last gave up (its broker gone for longer
        than forseti_max_retries/forseti_max_time): raises :class:`BrokerUnavailable` while the
        broker is still away."""
        if (self._loop.is_alive() and self._declared) or self._closed:
            return
        with self._start_lock:
            if not self._loop.is_alive() and not self._closed:
                if self._loop.ident is not None:
                    logger.info("forseti: the client's reply thread is back (it gave up on %r)", self._loop.failure)
                    self._loop, self._declared = self._new_loop(), False
                self._loop.start()  # connects while this thread declares below (issue 15)
            if not self._declared and not self._closed:
                # The reply queue must exist before anyone answers into it: before any request. Not
                # the exits: nothing is cached, no route kept, until the reply thread subscribed them.
                self._publisher.declare(self._reply_queue)
                self._declared = True

    def _node_rk(self, ref: KeyRef) -> str:
        return self.names.node_routing_key(ref.node)

    def close(self) -> None:
        """Send what is queued, stop the reply thread and release the connections."""
        self._closed = True
        self._flush_quietly()
        atexit.unregister(self._flush_quietly)
        self._loop.stop(wake=self._wake_loop)
        self._publisher.close()

    def _wake_loop(self) -> None:
        # An empty batch to our own reply queue answers the loop's pending read at once.
        try:
            self._publisher.publish(self.names.exchange, self._reply_rk, [])
        except BrokerUnavailable:
            pass  # then no read is pending either
