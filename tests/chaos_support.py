"""Tools of the chaos suite: private brokers, network namespaces, client load, and the invariant checker.

Everything here starts processes and namespaces of its own and stops them again; the machine's
shared Redis and RabbitMQ are never stopped or reconfigured. Needs Linux and root (network
namespaces); :func:`require` skips locally, and fails in CI, when something is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from forseti_celery import Forseti, KeyRef
from forseti_celery.core import protocol as p
from forseti_celery.core.broker import Publisher
from forseti_celery.testing import WorkerProcess, wait_for

from .conftest import in_ci
from .helpers import Harness

# --- environment ------------------------------------------------------------------------------


def require(*tools: str, root: bool = False) -> None:
    """Skip the test (fail it in CI) unless every tool is on PATH and, if asked, we are root."""
    missing = [t for t in tools if shutil.which(t) is None]
    if root and os.geteuid() != 0:
        missing.append("root privileges")
    if missing:
        message = f"chaos test needs {', '.join(missing)}"
        if in_ci():
            pytest.fail(f"CI=true but {message}")
        pytest.skip(message)


def free_port() -> int:
    """A TCP port nothing listens on now (on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _count(path: Path, needle: str) -> int:
    try:
        return path.read_text(errors="replace").count(needle)
    except FileNotFoundError:
        return 0


# --- network namespaces -------------------------------------------------------------------------

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NetnsPair:
    """Two network namespaces of our own, ``a`` and ``b``, joined by one veth pair.

    Addresses are link-local (169.254.77.0/30) and exist only inside these namespaces, so no
    traffic leaves them. :meth:`cut` takes ``b``'s end of the link down (packets are dropped,
    nothing is reset: a partition, not a crash); :meth:`heal` brings it back.
    """

    A_ADDR = "169.254.77.1"
    B_ADDR = "169.254.77.2"

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.a, self.b = f"fchaos-{tag}-a", f"fchaos-{tag}-b"
        self._veth_a, self._veth_b = f"fc{tag}a", f"fc{tag}b"  # interface names: 15 characters at most
        self._created: list[str] = []

    def __enter__(self) -> NetnsPair:
        try:
            for ns in (self.a, self.b):
                _ip("netns", "add", ns)
                self._created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", self.a, "link", "add", self._veth_a, "type", "veth", "peer", "name", self._veth_b,
                "netns", self.b)
            _ip("-n", self.a, "addr", "add", f"{self.A_ADDR}/30", "dev", self._veth_a)
            _ip("-n", self.b, "addr", "add", f"{self.B_ADDR}/30", "dev", self._veth_b)
            _ip("-n", self.a, "link", "set", self._veth_a, "up")
            _ip("-n", self.b, "link", "set", self._veth_b, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cut(self) -> None:
        """Take the link down: ``b`` can no longer reach ``a`` (nor the reverse)."""
        _ip("-n", self.b, "link", "set", self._veth_b, "down")

    def heal(self) -> None:
        """Bring the link up again."""
        _ip("-n", self.b, "link", "set", self._veth_b, "up")

    @contextlib.contextmanager
    def inside(self, ns: str) -> Iterator[None]:
        """Run the calling thread in namespace ``ns``: its new sockets, threads and subprocesses
        belong there (a network namespace is per thread; threads inherit their creator's)."""
        own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)

    def close(self) -> None:
        """Kill what still runs in our namespaces (only what this test started there), delete them."""
        for ns in reversed(self._created):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout
            for pid in pids.split():
                if int(pid) != os.getpid():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._created.clear()


# --- private brokers ----------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of this test only, on a port of its own: killed and started again at will.

    It runs in the network namespace of the thread that starts it (see :meth:`NetnsPair.inside`).
    """

    def __init__(self, workdir: Path, bind: tuple[str, ...] = ("127.0.0.1",)) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bind = bind
        self.port = free_port()
        self.log = workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.bind[0]}:{self.port}/0"

    def start(self, timeout: float = 20.0) -> PrivateRedis:
        """Start (again, on the same port) and wait until it accepts connections."""
        argv = ["redis-server", "--port", str(self.port), "--bind", *self.bind, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--protected-mode", "no", "--dir", str(self.workdir), "--logfile", str(self.log)]
        before = _count(self.log, "Ready to accept connections")
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        proc = self._proc
        wait_for(lambda: proc.poll() is not None or _count(self.log, "Ready to accept connections") > before,
                 timeout, message=lambda: f"redis-server not ready:\n{self.log.read_text(errors='replace')[-2000:]}")
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{self.log.read_text(errors='replace')[-2000:]}")
        return self

    def kill(self) -> None:
        """Crash it (SIGKILL): every connection drops, and everything it held is lost."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    close = kill


class PrivateRabbitMQ:
    """A RabbitMQ node of this test only: its own node name, ports, cookie and data folder.

    Runs ``rabbitmq-server`` with the Erlang VM in the foreground (``RABBITMQ_ALLOW_INPUT`` makes the
    script exec it; ``-noinput`` keeps the shell off), so the pid we hold is the VM's. ``guest`` may
    connect from any address (``loopback_users = none``): workers in another namespace need it.
    It runs in the network namespace of the thread that starts it, with an epmd of its own there.
    """

    READY = "Starting broker... completed"

    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.host = host
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"forseti-chaos-{uuid.uuid4().hex[:6]}@localhost"
        self.out = workdir / "stdout.log"
        home = workdir / "home"
        for d in (home, workdir / "mnesia", workdir / "log"):
            d.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        (workdir / "enabled_plugins").write_text("")
        (workdir / "rabbitmq-env.conf").write_text("")  # none of the machine's node settings
        (workdir / "rabbitmq.conf").write_text(f"listeners.tcp.default = {self.port}\nloopback_users = none\n")
        self.env = {
            **os.environ,
            "HOME": str(home),
            "RABBITMQ_CONF_ENV_FILE": str(workdir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(workdir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
            "RABBITMQ_ALLOW_INPUT": "1",
            "RABBITMQ_SERVER_START_ARGS": "-noinput",
        }
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{self.host}:{self.port}//"

    def start(self, timeout: float = 120.0) -> PrivateRabbitMQ:
        """Start (again, same node and ports) and wait until it accepts connections."""
        # Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user, who cannot write our folders.
        direct = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
        argv = [str(direct) if direct.exists() else "rabbitmq-server"]
        before = _count(self.out, self.READY)
        with open(self.out, "ab") as out:
            self._proc = subprocess.Popen(argv, env=self.env, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT)
        proc = self._proc
        wait_for(lambda: proc.poll() is not None or _count(self.out, self.READY) > before, timeout, 0.1,
                 message=lambda: f"RabbitMQ node not ready:\n{self.out.read_text(errors='replace')[-3000:]}")
        if proc.poll() is not None:
            raise RuntimeError(f"RabbitMQ node exited:\n{self.out.read_text(errors='replace')[-3000:]}")
        return self

    def kill(self) -> None:
        """Crash the node (SIGKILL): every connection drops; transient queues are gone on restart."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    close = kill


# --- the invariant: one live process per key --------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a live (not zombie) ``pid``, which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


@dataclass
class Life:
    """One keyed process, as its journal and the watcher saw it (times from ``time.time()``)."""

    pid: int
    key: str
    start: float  #: written by the process itself in ``init``
    ident: str | None = None
    last_alive: float = 0.0  #: last time the watcher saw it running (stopped with SIGSTOP counts)
    ended: float | None = None  #: its own "terminate"/"end" journal line, if it wrote one
    gone: float | None = None  #: first time the watcher found it gone

    @property
    def end_lo(self) -> float:
        """A time at which it certainly still lived."""
        return max(self.start, self.last_alive, self.ended or 0.0)


class Monitor(threading.Thread):
    """Watches every keyed process that the journal names, every ``interval`` seconds.

    Starts come from the journal the children write themselves (one ``<pid>.jsonl`` per process);
    an end is the process's own "terminate"/"end" line when it could write one, and the instant
    this watcher found its pid gone otherwise (SIGKILL, fencing, its worker's death). Violations:

    * two processes of one key seen alive in the same sweep;
    * a process of a key started before another one of that key was last known alive;
    * a process still alive when the run is over (:meth:`finish`).
    """

    def __init__(self, journal_dir: Path, interval: float = 0.02) -> None:
        super().__init__(name="chaos-monitor", daemon=True)
        self.journal_dir = journal_dir
        self.interval = interval
        self.lives: dict[int, Life] = {}
        self.concurrent: list[str] = []
        self._sizes: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sweep()
            self._stop_event.wait(self.interval)

    def sweep(self) -> None:
        """Read new journal lines, then look at every process not yet seen gone."""
        with self._lock:
            self._read_journal()
            alive_by_key: dict[str, list[int]] = {}
            for life in self.lives.values():
                if life.gone is not None:
                    continue
                ident = _start_time(life.pid)
                now = time.time()
                if ident is not None and life.ident in (None, ident):
                    life.ident = ident
                    life.last_alive = now
                    alive_by_key.setdefault(life.key, []).append(life.pid)
                else:
                    life.gone = now
            for key, pids in alive_by_key.items():
                if len(pids) > 1:
                    note = f"key {key!r}: processes {sorted(pids)} alive at once at {time.time():.3f}"
                    if not self.concurrent or self.concurrent[-1].split(" at ")[0] != note.split(" at ")[0]:
                        self.concurrent.append(note)

    def _read_journal(self) -> None:
        for path in self.journal_dir.glob("*.jsonl"):
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if self._sizes.get(path) == size:
                continue
            try:
                lines = path.read_text().splitlines()
            except FileNotFoundError:
                continue
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:
                    break  # being written: read again next sweep
                pid = int(entry["pid"])
                life = self.lives.get(pid)
                if entry["ev"] == "start" and life is None:
                    life = self.lives[pid] = Life(pid, entry["key"], float(entry["t"]))
                    life.last_alive = life.start
                elif entry["ev"] in ("terminate", "end") and life is not None:
                    life.ended = float(entry["t"])
            else:
                self._sizes[path] = size

    # -- queries ------------------------------------------------------------------------------
    def alive(self) -> dict[int, Life]:
        """The processes the last sweep saw running, by pid."""
        self.sweep()
        with self._lock:
            return {pid: life for pid, life in self.lives.items() if life.gone is None}

    def of_key(self, key: str) -> list[Life]:
        """Every process the key has had, oldest first."""
        with self._lock:
            return sorted((life for life in self.lives.values() if life.key == key), key=lambda life: life.start)

    def get(self, pid: int) -> Life | None:
        """The process ``pid``, if the journal named it."""
        with self._lock:
            return self.lives.get(pid)

    def violations(self) -> list[str]:
        """Every certain breach of "one live process per key" seen so far."""
        with self._lock:
            found = list(self.concurrent)
            by_key: dict[str, list[Life]] = {}
            for life in self.lives.values():
                by_key.setdefault(life.key, []).append(life)
            for key, lives in by_key.items():
                lives.sort(key=lambda life: life.start)
                for i, older in enumerate(lives):
                    for newer in lives[i + 1:]:
                        if newer.start < older.end_lo:
                            found.append(f"key {key!r}: pid {newer.pid} started at {newer.start:.3f} while pid "
                                         f"{older.pid} (started {older.start:.3f}) still lived at {older.end_lo:.3f}")
            return found

    def finish(self, grace: float = 5.0) -> list[str]:
        """After the cluster stopped: wait up to ``grace`` s for every process to be gone, stop watching,
        and return every violation (overlaps, and processes that outlived the run)."""
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not self.alive(), grace, 0.05)
        self._stop_event.set()
        self.join(5)
        self.sweep()
        outlived = [f"pid {life.pid} (key {life.key!r}) outlived the run" for life in self.lives.values()
                    if life.gone is None]
        return self.violations() + outlived


# --- clients under load -----------------------------------------------------------------------------


@dataclass
class Request:
    """One client request and what came of it."""

    op: str
    key: str
    sent: float  #: monotonic
    done: float = 0.0
    ref: KeyRef | None = None
    error: BaseException | None = None

    @property
    def took(self) -> float:
        return self.done - self.sent


@dataclass
class Load:
    """Client threads calling ``get_key`` and ``search_key`` on ``keys`` in turn until stopped."""

    forseti: Forseti
    keys: list[str]
    threads: int = 3
    timeout: float = 15.0
    ops: tuple[str, ...] = ("get", "search")
    name: str = "default"
    args: tuple[Any, ...] = ()
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"chaos-client-{i}", daemon=True)
                         for i in range(self.threads)]
        self._lock = threading.Lock()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 10)

    def _run(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            i = index * 7 + n  # threads start apart; each key gets every op, round after round
            key = self.keys[i % len(self.keys)]
            op = self.ops[(i // len(self.keys) + index) % len(self.ops)]
            n += 1
            req = Request(op, key, time.monotonic())
            try:
                if op == "get":
                    req.ref = self.forseti.get_key(key, self.args, name=self.name, timeout=self.timeout)
                else:
                    req.ref = self.forseti.search_key(key, name=self.name, timeout=self.timeout)
            except Exception as exc:  # recorded; the test decides
                req.error = exc
            req.done = time.monotonic()
            with self._lock:
                self.requests.append(req)

    def since(self, t: float) -> list[Request]:
        """Requests sent at or after monotonic time ``t``."""
        with self._lock:
            return [r for r in self.requests if r.sent >= t]

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def wait_progress(self, n: int, timeout: float) -> None:
        """Wait until ``n`` more requests have completed."""
        target = self.count() + n
        wait_for(lambda: self.count() >= target, timeout, message=f"clients made no progress ({n} requests)")


# --- the cluster's own view ------------------------------------------------------------------------


def ask(h: Harness, command: str, hosts: list[str], timeout: float = 5.0) -> dict[str, Any]:
    """Replies of ``hosts`` to a remote-control ``command`` (missing hosts simply do not appear)."""
    try:
        replies = h.app.control.broadcast(command, destination=hosts, reply=True, timeout=timeout, limit=len(hosts))
    except h.app.connection_for_write().connection_errors:  # our own connection died with the broker: ask again
        return {}
    return {host: body for reply in replies for host, body in reply.items()}


def leaders(h: Harness, hosts: list[str], timeout: float = 5.0) -> list[str] | None:
    """Hosts whose ``inspect stats`` say ``leader: true``; ``None`` unless all ``hosts`` answered."""
    stats = ask(h, "stats", hosts, timeout)
    if set(stats) != set(hosts):
        return None
    return sorted(host for host, s in stats.items() if s.get("forseti", {}).get("leader"))


def wait_one_leader(h: Harness, hosts: list[str], timeout: float = 30.0) -> str:
    """Wait until exactly one of ``hosts`` (all answering) leads with a ready table; return it."""
    def one() -> str | None:
        found = leaders(h, hosts, timeout=3.0)
        return found[0] if found is not None and len(found) == 1 else None
    return wait_for(one, timeout, 0.2, lambda: f"not exactly one leader among {hosts}: {leaders(h, hosts)}")


def wait_takeover(h: Harness, hosts: list[str], timeout: float = 30.0) -> str:
    """Wait until one of ``hosts`` holds the leader role, ready to serve or still rebuilding its table
    (``inspect stats`` shows a ``table`` while the role is held); return it."""
    def taking() -> str | None:
        stats = ask(h, "stats", hosts, timeout=3.0)
        active = [host for host, s in stats.items() if "table" in s.get("forseti", {})]
        return active[0] if len(active) == 1 else None
    return wait_for(taking, timeout, 0.1, f"none of {hosts} took the leader role")


def inconsistencies(h: Harness, hosts: list[str], monitor: Monitor) -> list[str]:
    """How the leader's table, the workers' registries and the live processes disagree ([] if not).

    Every live keyed process must be listed by exactly one worker, found by ``search_key`` under that
    worker and pid, and counted once in ``get_metrics``; every listed process must be alive.
    """
    problems: list[str] = []
    listed = ask(h, "forseti_keys", hosts, timeout=5.0)
    if set(listed) != set(hosts):
        return [f"no forseti_keys answer from {sorted(set(hosts) - set(listed))}"]
    metrics = h.forseti.get_metrics(timeout=10)
    where: dict[str, tuple[str, int]] = {}
    for host, body in listed.items():
        keys = [k for k in body["keys"] if k["started"]]
        if metrics.get(host, 0) != len(keys):
            problems.append(f"metrics say {metrics.get(host)} processes on {host}, it lists {len(keys)}")
        for k in keys:
            if k["key"] in where:
                problems.append(f"{k['key']!r} listed by {where[k['key']]} and {(host, k['pid'])}")
            where[k["key"]] = (host, k["pid"])
    for key, (host, pid) in sorted(where.items()):
        found = h.forseti.search_key(key, timeout=10)
        if found is None or (found.node, found.pid) != (host, pid):
            problems.append(f"{key!r} runs as {(host, pid)} but search_key says {found}")
    live = {life.key: pid for pid, life in monitor.alive().items()}
    for key, pid in sorted(live.items()):
        if where.get(key, ("", -1))[1] != pid:
            problems.append(f"live process {pid} of {key!r} is not listed by any worker (listed: {where.get(key)})")
    for key, (host, pid) in sorted(where.items()):
        if live.get(key) != pid:
            problems.append(f"{host} lists {key!r} as pid {pid}, which is not running")
    return problems


def wait_consistent(h: Harness, hosts: list[str], monitor: Monitor, timeout: float = 20.0) -> None:
    """Wait until :func:`inconsistencies` finds nothing (messages may still be in flight)."""
    last: list[list[str]] = [[]]

    def ok() -> bool:
        try:
            last[0] = inconsistencies(h, hosts, monitor)
        except Exception as exc:  # a timeout while the cluster settles
            last[0] = [repr(exc)]
        return not last[0]
    wait_for(ok, timeout, 0.3, lambda: "table and workers disagree:\n  " + "\n  ".join(last[0]))


def spread(h: Harness, prefix: str, per_worker: int, hosts: list[str]) -> dict[str, KeyRef]:
    """Create keys until each of ``hosts`` holds ``per_worker`` of them (least-used placement); by key."""
    refs: dict[str, KeyRef] = {}
    i = 0
    while min(sum(r.node == host for r in refs.values()) for host in hosts) < per_worker:
        key = f"{prefix}-{i}"
        refs[key] = h.forseti.get_key(key, timeout=15)
        i += 1
        assert i < per_worker * len(hosts) * 3, f"placement never reached {hosts}: {refs}"
    return refs


def timed(fn: Callable[[], Any]) -> tuple[float, Any, BaseException | None]:
    """(seconds taken, result, exception) of ``fn()``."""
    t0 = time.monotonic()
    try:
        result = fn()
    except Exception as exc:
        return time.monotonic() - t0, None, exc
    return time.monotonic() - t0, result, None


def report(what: str, **figures: Any) -> None:
    """Print a measurement (shown with ``-s``, and in the log of a failed test)."""
    print(f"[chaos] {what}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in figures.items()))


@contextmanager
def chaos(url: str, tmp: Path, n: int = 3, pool: str = "solo", start: bool = True, app: str = "tests.app",
          cache: bool = False, **env: str) -> Iterator[tuple[Harness, Monitor]]:
    """A cluster of ``app``'s workers (started unless ``start`` is false) under a :class:`Monitor`;
    on exit: no orphans, no duplicate, ever."""
    h = Harness(url, tmp, n=n, pool=pool, app=app, **env)
    # Every lookup goes to the leader (unless ``cache``): these tests check its table, not a
    # client's cache of refs.
    h.app.conf.forseti_cache = cache
    monitor = Monitor(h.journal_dir)
    monitor.start()
    passed = False
    try:
        if start:
            h.start()
        yield h, monitor
        passed = True
    finally:
        if not passed:
            print(h.cluster.log_tails(80))
        orphans = h.stop()
        problems = monitor.finish()
        if not passed and problems:
            print("invariant violations:\n  " + "\n  ".join(problems))
    assert not orphans, f"orphan processes left: {orphans}"
    assert not problems, "one live process per key was broken:\n  " + "\n  ".join(problems)


# --- neighbours: keys that must not notice what happens to another key of their worker ------------


class Neighbours(threading.Thread):
    """Asks every one of ``refs`` for its state, round after round, until stopped: ``get_key`` must
    give the same process (node and pid) and a ``call`` must answer the state (``refs[ref]``).

    Give it a client of its own (not the one that misbehaves): a client sends what it was given in
    order, so its own large sends would hold up the questions, whatever the worker does.
    """

    def __init__(self, forseti: Forseti, refs: dict[KeyRef, int], timeout: float = 10.0) -> None:
        super().__init__(name="chaos-neighbours", daemon=True)
        self.forseti, self.refs, self.timeout = forseti, refs, timeout
        self.rounds = 0
        self.latencies: list[float] = []  #: of each get_key and call, seconds
        self.failures: list[str] = []
        self._stop_event = threading.Event()

    def ask_all(self) -> None:
        """One round: every neighbour, found by the leader where it was, answers with its state."""
        for ref, value in self.refs.items():
            try:
                t0 = time.perf_counter()
                found = self.forseti.get_key(ref.key, timeout=self.timeout)
                got = found.call("get", timeout=self.timeout)
                self.latencies.append(time.perf_counter() - t0)
            except Exception as exc:  # recorded; the test decides
                self.failures.append(f"{ref.key!r}: {exc!r}")
                continue
            if found != ref:
                self.failures.append(f"{ref.key!r} is now {found}, was {ref}")
            if got != value:
                self.failures.append(f"{ref.key!r} answered {got!r}, not its state {value!r}")
        self.rounds += 1

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.ask_all()

    def wait_rounds(self, n: int, timeout: float = 60.0) -> None:
        """Wait until ``n`` more full rounds were asked."""
        target = self.rounds + n
        wait_for(lambda: self.rounds >= target or not self.is_alive(), timeout, 0.01,
                 lambda: f"neighbours asked only {self.rounds} rounds of {target}")

    def stop(self) -> None:
        self._stop_event.set()
        self.join(len(self.refs) * 2 * self.timeout + 5)


# --- forged messages: what anyone who can write to the broker can publish ------------------------


def forge(h: Harness, routing_key: str, msg: dict[str, Any], broadcast: bool = False) -> None:
    """Publish ``msg`` as a forger would: to a queue of the namespace, or to the heartbeat fanout."""
    names = h.forseti.names
    publisher = Publisher(h.app.connection_for_write())
    try:
        if broadcast:
            publisher.publish(names.bcast_exchange, "", [msg])
        else:
            publisher.publish(names.exchange, routing_key, [msg],
                              declare=[names.leader_queue] if routing_key == names.leader else [])
    finally:
        publisher.close()


def forged_exit(ref: KeyRef) -> dict[str, Any]:
    """An exit report of a live process, with everything a client knows of it (a KeyRef)."""
    return {"t": p.EXITED, "n": ref.name, "k": ref.key, "node": ref.node, "pid": ref.pid,
            "sid": uuid.uuid4().hex, "reason": "normal"}


def forged_start(ref: KeyRef) -> dict[str, Any]:
    """A start report naming a live process."""
    return {"t": p.SPAWNED, "n": ref.name, "k": ref.key, "node": ref.node, "pid": ref.pid, "sid": uuid.uuid4().hex}


def forged_spawn(key: str, epoch: int = 10**9) -> dict[str, Any]:
    """A leader's order to start ``key``, claiming ``epoch``."""
    return {"t": p.SPAWN, "n": "default", "k": key, "a": [], "sid": uuid.uuid4().hex, "epoch": epoch,
            "leader": "forger@nowhere", "w": []}


def forged_heartbeat(node: str, inc: str | None = None, leader: bool = False, epoch: int = 0) -> dict[str, Any]:
    """A heartbeat of ``node`` (a new incarnation unless ``inc``); a leader's claims ``epoch``."""
    return {"t": p.HEARTBEAT, "node": node, "inc": inc or uuid.uuid4().hex, "seq": 1, "eligible": not leader,
            "names": [] if leader else ["default"], "count": 0, "leader": leader, "epoch": epoch}


def forged_bye(node: str, inc: str | None = None) -> dict[str, Any]:
    """A goodbye of ``node`` (of an incarnation it never had unless ``inc``)."""
    return {"t": p.BYE, "node": node, "inc": inc or uuid.uuid4().hex}


# --- a pids cgroup: a worker at its process limit ---------------------------------------------------

PIDS = Path("/sys/fs/cgroup/pids")


@contextmanager
def pids_group() -> Iterator[Path]:
    """A fresh cgroup v1 pids group (skips without root or the controller); its processes are moved
    back to the root group at the end."""
    if os.geteuid() != 0:
        pytest.skip("moving processes between cgroups needs root")
    if not (PIDS / "cgroup.procs").exists():
        pytest.skip(f"no cgroup v1 pids controller at {PIDS}")
    group = PIDS / f"forseti-test-{uuid.uuid4().hex}"
    group.mkdir()
    try:
        yield group
    finally:
        (group / "pids.max").write_text("max")

        def moved() -> bool:  # again and again: a process forked in the group meanwhile (a spare) stays there
            pids = (group / "cgroup.procs").read_text().split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    (PIDS / "cgroup.procs").write_text(pid)
            return not pids

        wait_for(moved, 10.0, message=f"{group} kept processes")
        group.rmdir()


def _cgroups(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return ""


def join_group(group: Path, worker: WorkerProcess) -> None:
    """Move the worker and all its descendants into ``group`` (until no process is left outside:
    one forked while the others were being moved stays in its parent's old group)."""

    def outside() -> list[int]:
        return [pid for pid in [worker.pid, *worker.descendants()] if f"pids:/{group.name}\n" not in _cgroups(pid)]

    def move() -> bool:
        for pid in outside():
            with contextlib.suppress(ProcessLookupError):
                (group / "cgroup.procs").write_text(str(pid))
        return not outside()

    wait_for(move, 10.0, message=lambda: f"still outside {group.name}: {outside()}")
