"""The zygote: a small, quiet process forked by a worker at start that forks its spares.

A fork from the worker itself holds the worker's interpreter while the kernel copies its page
tables, and afterwards every page the busy worker writes is copied once more (the child still
shares it), which costs the worker CPU and leaves the child's memory private. The zygote does
nothing after its own fork, so the spares it forks keep sharing its pages and the worker's
threads never wait for a fork.

Spares forked by the zygote are the worker's grandchildren: the worker receives each one's end
of the pipe over a Unix socket (``SCM_RIGHTS``), watches its exit through a pidfd, and learns its
exit status from the zygote, which reaps it. A spare dies with the zygote
(``PR_SET_PDEATHSIG``), the zygote with the worker's main thread, and both when the worker's
end of their socket or pipe closes. The zygote also looks at the worker's
:class:`~forseti_celery.child.runtime.Lifeline` for all of them (every half heartbeat) and kills them
when the worker is cut off, so an idle keyed process never wakes up.

With ``forseti_zygote = "exec"`` the zygote is no fork of the worker but a new interpreter
(:func:`boot`), as multiprocessing's *forkserver* is: it imports the modules of the registered
keyed processes (each named ``"module:qualname"`` by the worker, :func:`ref_of`), maps the
lifeline from a memfd, and then runs the same loop. Its spares fork from a small process whose
memory the kernel never shares with the busy worker, which costs each fork and each new keyed
process less (docs/benchmarks.rst, "A zygote forked, or started by exec").
"""

from __future__ import annotations

import _socket
import errno
import gc
import importlib
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import billiard
import billiard.connection

from ...child import runtime as child_main
from ...core import compat, process
from ...core.conf import ChildConfig

__all__ = ["Grandchild", "Zygote", "available", "boot", "ref_of"]

MAX_BATCH = 16  #: spares forked for one request at most
#: Seconds the first request waits for a zygote started by exec to have imported what it needs.
BOOT_TIMEOUT = 60.0
_BOOT = "import sys; from forseti_celery.worker.pool.zygote import boot; boot(int(sys.argv[1]))"

try:  # the C function: signal.signal turns its answer into an enum, which copies ~35 pages into a new spare
    _set_handler: Callable[[int, int], Any] = importlib.import_module("_signal").signal
except (ImportError, AttributeError):  # not CPython
    _set_handler = signal.signal


def available() -> bool:
    """Whether this system has what the zygote needs (Linux pidfds, fd passing)."""
    return hasattr(os, "pidfd_open") and hasattr(socket, "send_fds") and sys.platform.startswith("linux")


class Zygote:
    """The worker's handle on its zygote; :meth:`fork` from the spawner thread only, exits read by
    the watcher thread (:attr:`exit_fd`, :meth:`read_exits`)."""

    def __init__(self, process_class: Any, config: ChildConfig, lifeline: child_main.Lifeline,
                 resolve: Callable[[str], Any], close_fds: Iterable[int], *,
                 refs: dict[str, str] | None = None) -> None:
        """A zygote forked from this process; with ``refs`` (keyed-process name ->
        ``"module:qualname"``, see :func:`ref_of`), one started by exec that serves those names
        (``lifeline`` must then be mappable). Raises :class:`OSError` if it could not start
        (:class:`ValueError` for a lifeline that is not mappable)."""
        self._requests, their_requests = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._exits, their_exits = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._exits.setblocking(False)
        self._refs = refs
        #: Started by exec and not yet known to have imported its targets (the first request waits).
        self._booting = refs is not None
        self.process: Any
        try:
            if refs is not None:
                self.process = _Execd(their_requests, their_exits, config, lifeline, refs)
            else:
                keep_closed = [self._requests.fileno(), self._exits.fileno(), *close_fds]
                self.process = process_class(
                    target=_main, name="forseti:zygote",
                    args=(their_requests, their_exits, config, lifeline, resolve, os.getpid(), keep_closed),
                )
                self.process.start()
        except BaseException:
            self._requests.close()
            self._exits.close()
            raise
        finally:
            their_requests.close()
            their_exits.close()
        self.exit_fd = self._exits.fileno()
        self._codes: dict[int, int] = {}
        self._forgotten: set[int] = set()  # reaped before their status came: dropped when it does
        #: False once a request failed: the worker then forks its spares itself.
        self.alive = True

    @property
    def execd(self) -> bool:
        """Whether this zygote was started by exec (a new interpreter), not forked."""
        return self._refs is not None

    def serves(self, name: str) -> bool:
        """Whether a spare of this zygote can run keyed-process ``name`` (one started by exec
        knows the names the worker had registered when it started it)."""
        return self._refs is None or name in self._refs

    @property
    def fds(self) -> list[int]:
        """The worker's ends of the zygote's sockets (other children must not keep them open)."""
        return [self._requests.fileno(), self._exits.fileno()]

    def fork(self, timeout: float = 5.0) -> tuple[Grandchild, int]:
        """Have a spare forked: the spare, and the worker's end of its pipe (an fd now ours).

        Raises :class:`OSError` when a resource ran out (processes, fds, memory: in the zygote, or
        fds here); the zygote lives on. Raises :class:`EOFError` once the zygote has ended
        (:attr:`alive` is then False).
        """
        got = self.fork_many(1, timeout)[0]
        if isinstance(got, OSError):
            raise got
        return got

    def fork_many(self, n: int, timeout: float = 5.0) -> list[tuple[Grandchild, int] | OSError]:
        """Have ``n`` spares (1 to :data:`MAX_BATCH`) forked in one round trip: the zygote forks
        them back to back, so a burst of new keys (a handoff's) waits for one wake-up of the
        zygote, not one per fork. Each is as :meth:`fork` returns it, or the :class:`OSError` it
        would raise; :class:`EOFError` once the zygote has ended (what came is closed then)."""
        got: list[tuple[Grandchild, int] | OSError] = []
        try:
            if self._booting:
                self._requests.settimeout(BOOT_TIMEOUT)
                said = self._requests.recv(4096)
                if said != b"r":
                    why = said[1:].decode(errors="replace") if said else "it ended"
                    raise EOFError(f"it could not start: {why}")
                self._booting = False
            self._requests.settimeout(timeout)
            self._requests.send(b"s" * max(1, min(n, MAX_BATCH)))
            for _ in range(max(1, min(n, MAX_BATCH))):
                got.append(self._answer(*socket.recv_fds(self._requests, 256, 2)[:3]))
        except (OSError, EOFError) as exc:  # (a timeout included: its answer could come after the next request's)
            self.alive = False
            for g in got:
                if not isinstance(g, OSError):
                    g[0].close()
                    os.close(g[1])
            raise EOFError(f"the zygote has ended: {exc!r}") from exc
        return got

    def _answer(self, msg: bytes, fds: list[int], flags: int) -> tuple[Grandchild, int] | OSError:
        if msg.startswith(b"!"):
            code, _, text = msg[1:].decode().partition(" ")
            return OSError(int(code), text)  # OSError(EAGAIN, ...) is a BlockingIOError, and so on
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            if msg and flags & socket.MSG_CTRUNC:
                # Forked, but the kernel had no fd here for its ends: it ends itself (its pipe is closed).
                return OSError(errno.EMFILE, "no file descriptor left for a spare's pipe (recvmsg)")
            raise EOFError("the zygote has ended")
        return Grandchild(int(msg), fds[1], self), fds[0]

    def read_exits(self) -> None:
        """Record the exit statuses the zygote has sent (non-blocking)."""
        while True:
            try:
                data = self._exits.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.alive = False  # (reset: ended too)
                return
            if not data:  # the zygote has ended: its socket stays readable (the watcher stops polling it)
                self.alive = False
                return
            pid, code = data.split()
            if int(pid) in self._forgotten:
                self._forgotten.discard(int(pid))
            else:
                self._codes[int(pid)] = int(code)

    def exitcode(self, pid: int) -> int | None:
        """The exit status of a spare the zygote has reaped (negative: killed by that signal)."""
        return self._codes.get(pid)

    def wait(self, pid: int, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the exit status of ``pid``."""
        deadline = time.monotonic() + timeout
        while pid not in self._codes:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._exits.fileno() < 0 or not self.alive:
                return None  # (the zygote has ended, or was stopped: the worker is shutting down)
            select.select([self._exits], [], [], remaining)
            self.read_exits()
        return self._codes[pid]

    def forget(self, pid: int) -> None:
        """Drop the exit status of a reaped spare."""
        if self._codes.pop(pid, None) is None:
            self._forgotten.add(pid)

    def stop(self) -> None:
        """End the zygote (its spares end with it)."""
        for sock in (self._requests, self._exits):
            try:
                sock.close()
            except OSError:
                pass
        try:
            os.kill(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.join(2)


class _Execd:
    """What :class:`Zygote` needs of a process (``pid``, ``join``), for a zygote started by exec:
    ``python -c`` running :func:`boot`, given its two sockets, the lifeline's memfd and a pipe
    from which it reads the rest (the config, the targets by name, ``sys.path``, logging)."""

    def __init__(self, requests: socket.socket, exits: socket.socket, config: ChildConfig,
                 lifeline: child_main.Lifeline, refs: dict[str, str]) -> None:
        if lifeline.fd is None:
            raise ValueError("a zygote started by exec needs a mappable lifeline")
        payload = pickle.dumps({
            "config": config, "refs": refs, "path": list(sys.path), "logging": _logging_of(logging.getLogger()),
            "requests": requests.fileno(), "exits": exits.fileno(), "lifeline": lifeline.fd,
            "check_every": lifeline.check_every, "worker_pid": os.getpid(),
        })
        r, w = os.pipe()
        try:
            if len(payload) > 65536:  # more than a pipe holds: the worker would wait for the new interpreter
                raise ValueError(f"the exec'd zygote's start order is too large ({len(payload)} bytes)")
            os.write(w, payload)  # (a pipe holds it: the worker never waits here)
            os.close(w)
            w = -1
            self._popen = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(r)], pass_fds=(r, requests.fileno(), exits.fileno(), lifeline.fd))
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        self.pid = self._popen.pid

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass


def ref_of(target: Any) -> str | None:
    """``"module:qualname"`` naming ``target`` for a new interpreter to import, or ``None`` when
    the name would not give this very object (defined in ``__main__``, in a function, or rebound)."""
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or module == "__main__" or "<locals>" in qualname:
        return None
    ref = f"{module}:{qualname}"
    try:
        return ref if _by_name(ref) is target else None
    except Exception:
        return None


def _by_name(ref: str) -> Any:
    module, _, qualname = ref.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _logging_of(root: logging.Logger) -> tuple[int, list[tuple[str, str, str | None]]]:
    """The worker's root logging, as a new interpreter can set it up again (:func:`_log_as`): its
    level, and each handler writing to a file or to the standard error or output."""
    handlers: list[tuple[str, str, str | None]] = []
    for h in root.handlers:
        fmt = getattr(h.formatter, "_fmt", None)
        if isinstance(h, logging.FileHandler):
            handlers.append(("file", h.baseFilename, fmt))
        elif isinstance(h, logging.StreamHandler) and h.stream in (sys.__stderr__, sys.stderr):
            handlers.append(("stderr", "", fmt))
        elif isinstance(h, logging.StreamHandler) and h.stream in (sys.__stdout__, sys.stdout):
            handlers.append(("stdout", "", fmt))
    return root.level, handlers


def _log_as(level: int, handlers: list[tuple[str, str, str | None]]) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    for kind, path, fmt in handlers:
        h: logging.Handler = (logging.FileHandler(path) if kind == "file"
                              else logging.StreamHandler(sys.stdout if kind == "stdout" else sys.stderr))
        h.setFormatter(logging.Formatter(fmt))
        root.addHandler(h)


def boot(fd: int) -> None:
    """A zygote started by exec (``python -c``): read its start order from pipe ``fd``, import
    the targets and take the worker's ``sys.path`` and logging, say it is ready (``r``, or ``!``
    and why not) on its request socket, then serve as a forked zygote does (:func:`_main`)."""
    with os.fdopen(fd, "rb") as f:
        order = pickle.load(f)
    requests = socket.socket(fileno=order["requests"])
    exits = socket.socket(fileno=order["exits"])
    config: ChildConfig = order["config"]
    try:
        sys.path[:] = order["path"]
        _log_as(*order["logging"])
        lifeline = child_main.Lifeline.attach(order["lifeline"], config.fence_after, order["check_every"])
        targets = {name: _by_name(ref) for name, ref in order["refs"].items()}
        for target in targets.values():
            process.is_async(target)  # remembered before any fork, as the worker does at registration
    except BaseException as exc:
        requests.send(b"!" + f"{type(exc).__name__}: {exc}".encode()[:4000])
        os._exit(1)
    requests.send(b"r")
    _main(requests, exits, config, lifeline, targets.get, order["worker_pid"], [])


class Grandchild:
    """What the pool needs of a process (as of a :class:`~forseti_celery.worker.pool.fork.KeyedChild`),
    for a zygote's spare."""

    def __init__(self, pid: int, pidfd: int, zygote: Zygote) -> None:
        self.pid = pid
        self._zygote = zygote
        #: Readable once the process has ended (a pidfd the zygote opened before it could reap it).
        self.sentinel = pidfd

    @property
    def exitcode(self) -> int | None:
        return self._zygote.exitcode(self.pid)

    def join(self, timeout: float | None = None) -> None:
        self._zygote.wait(self.pid, 1.0 if timeout is None else timeout)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Release the pidfd and the recorded status (after the exit has been handled)."""
        self._zygote.forget(self.pid)
        try:
            os.close(self.sentinel)
        except OSError:
            pass


def _main(requests: socket.socket, exits: socket.socket, config: ChildConfig, lifeline: child_main.Lifeline,
          resolve: Callable[[str], Any], worker_pid: int, close_fds: Iterable[int]) -> None:
    """The zygote's loop (in the zygote process): fork a spare for each request, report exits."""
    gc.disable()  # never walk (and so write) the heap it shares with the worker and the spares
    gc.freeze()  # nor should its spares (their own gc.freeze() then has nothing left to move)
    child_main.detach(worker_pid, close_fds)
    # The worker's Thread objects are dead copies here; os.fork() would reset their locks again in
    # every spare (copying the pages they sit on).
    compat.forget_dead_threads()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    me = os.getpid()
    children: set[int] = set()
    fenced: set[int] = set()  # killed for the lifeline: reported with the code they would have ended with
    check = lifeline.check_every
    next_check = time.monotonic() + check
    fixed = [requests.fileno(), exits.fileno(), wake_r, wake_w]  # what no spare keeps open
    asks = requests.fileno()
    readable = [asks, wake_r]

    def spare(conn: int, fds: list[int]) -> None:
        _spare(conn, fds, config, lifeline, resolve, me)

    while True:
        now = time.monotonic()
        if now >= next_check:
            # One look at the lifeline for all the worker's keyed processes, which then never wake
            # up for it themselves: a worker cut off (stopped, hung) has them all killed here.
            next_check = now + check
            if lifeline.cut_off():
                for pid in children - fenced:
                    os.kill(pid, signal.SIGKILL)
                    fenced.add(pid)
        ready, _, _ = select.select(readable, [], [], max(0.0, next_check - now))
        if wake_r in ready:  # a signal (SIGCHLD: a spare has ended)
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            _reap(exits, children, fenced)
        if asks not in ready:
            continue
        asked = requests.recv(MAX_BATCH)
        if not asked:
            os._exit(0)  # the worker is gone
        # One spare per byte, each answered in a packet of its own.
        for got in _fork_batch(len(asked), fixed, spare):
            if isinstance(got, _Refused):
                # Out of processes, fds or memory: the worker is told, and the zygote lives on, with
                # every keyed process it forked (they would die with it).
                requests.send(f"!{got.errno} {got.text}".encode())
                continue
            pid, ours, pidfd = got
            children.add(pid)
            socket.send_fds(requests, [str(pid).encode()], [ours, pidfd])
            os.close(ours)
            os.close(pidfd)


class _Refused(Exception):
    """A spare could not be forked (``errno``, ``text``: what ran out, and at which step)."""

    def __init__(self, exc: OSError, step: str) -> None:
        super().__init__(exc)
        self.errno = exc.errno or 0
        self.text = f"{exc.strerror or exc} ({step})"


def _fork_batch(n: int, fixed: list[int],
                run: Callable[[int, list[int]], None]) -> list[tuple[int, int, int] | _Refused]:
    """Fork ``n`` spares, each running ``run(its end of its socket pair, fds it must close)``: per
    spare its pid, our end of its pair and a pidfd, or why it could not be forked (nothing left
    open or running for it then).

    Every page the zygote writes after a fork is copied (the spare just forked shares it), so the
    forks come back to back, in a loop that does nothing else: the pairs are made before the
    first, the pidfds opened and the spares' ends closed after the last."""
    pairs: list[tuple[int, int]] = []
    out: list[tuple[int, int, int] | _Refused] = []
    for _ in range(n):
        try:
            a, b = _socket.socketpair(socket.AF_UNIX)  # blocking, as billiard.Pipe(duplex=True) makes them
        except OSError as exc:
            out.append(_Refused(exc, "pipe"))
            continue
        pairs.append((a.detach(), b.detach()))
    pids: list[int | _Refused] = []
    fork = os.fork
    for _, theirs in pairs:
        try:
            pid = fork()
        except OSError as exc:
            pids.append(_Refused(exc, "fork"))
            continue
        if pid == 0:
            run(theirs, [*fixed, *(fd for pair in pairs for fd in pair if fd != theirs)])  # never returns
        pids.append(pid)
    for (ours, theirs), forked in zip(pairs, pids, strict=True):
        os.close(theirs)
        if isinstance(forked, _Refused):
            os.close(ours)
            out.append(forked)
            continue
        try:
            pidfd = os.pidfd_open(forked)  # before any waitpid: it is our child, at worst a zombie
        except OSError as exc:
            os.kill(forked, signal.SIGKILL)
            os.waitpid(forked, 0)
            os.close(ours)
            out.append(_Refused(exc, "pidfd_open"))
            continue
        out.append((forked, ours, pidfd))
    return out


def _spare(fd: int, close_fds: list[int], config: ChildConfig, lifeline: child_main.Lifeline,
           resolve: Callable[[str], Any], zygote_pid: int) -> None:
    """In a process the zygote has just forked: undo what only the zygote wanted, then become a
    spare keyed process (as a fork of the worker does, see :func:`~forseti_celery.child.runtime.become_keyed`)."""

    def body() -> None:
        signal.set_wakeup_fd(-1)
        _set_handler(int(signal.SIGCHLD), int(signal.SIG_DFL))  # the rest is as detach() left it in the zygote
        child_main.run(billiard.connection.Connection(fd), config, lifeline, resolve, zygote_pid, close_fds,
                       from_zygote=True)

    os._exit(child_main.become_keyed(body, "spare"))


def _reap(exits: socket.socket, children: set[int], fenced: set[int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        code = child_main.FENCED if pid in fenced else os.waitstatus_to_exitcode(status)
        fenced.discard(pid)
        try:
            exits.send(f"{pid} {code}".encode())
        except OSError:
            pass
