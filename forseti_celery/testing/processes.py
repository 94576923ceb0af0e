"""Real ``celery worker`` subprocesses for tests, and the processes they leave behind.

A :class:`WorkerProcess` is one ``python -m celery worker`` subprocess logging to its own
file. Each is started with a private marker in its environment, which its forked children
inherit; after shutdown, any live process still carrying the marker is an orphan, found even
after it was re-parented to init (:func:`marked_pids`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from ..core.errors import ForsetiError

__all__ = [
    "MARKER_ENV",
    "ClusterError",
    "WaitTimeout",
    "WorkerProcess",
    "descendants_of",
    "marked_pids",
    "wait_for",
]

T = TypeVar("T")

#: Environment variable whose value marks every process a harness worker started.
MARKER_ENV = "FORSETI_TESTING_MARKER"


class ClusterError(ForsetiError, RuntimeError):
    """Raised when a worker does not become ready, or exits while being waited on."""


class WaitTimeout(AssertionError):
    """Raised by :func:`wait_for` when the condition is still false at the deadline."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy value.

    Returns that value; raises :class:`WaitTimeout` with ``message`` (a string or a callable
    building one, for state read at the deadline) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise WaitTimeout(f"{text} (waited {timeout} s)")
        time.sleep(interval)


# --- /proc helpers (Linux) -----------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """``(ppid, state)`` of ``pid`` from ``/proc/<pid>/stat``, or ``None`` if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            data = fh.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = data[data.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _is_running(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")


def descendants_of(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for candidate in _all_pids():
        stat = _proc_stat(candidate)
        if stat is not None and stat[1] not in ("Z", "X"):
            children.setdefault(stat[0], []).append(candidate)
    found: list[int] = []
    todo = list(children.get(pid, ()))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, ()))
    return sorted(found)


def marked_pids(marker: str) -> list[int]:
    """Pids of live processes whose initial environment holds ``MARKER_ENV=<marker>...``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for pid in _all_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                environ = fh.read().split(b"\0")
        except OSError:
            continue
        if any(entry.startswith(needle) for entry in environ) and _is_running(pid):
            found.append(pid)
    return sorted(found)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --- one worker ------------------------------------------------------------------------------


class WorkerProcess:
    """One real ``celery worker`` subprocess, logging stdout and stderr to ``<log_dir>/<name>.log``."""

    def __init__(
        self,
        app_module: str,
        hostname: str,
        broker_url: str,
        log_dir: str | os.PathLike[str],
        *,
        pool: str = "prefork",
        concurrency: int = 1,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        marker: str | None = None,
        result_backend: str | None = None,
    ) -> None:
        self.app_module = app_module
        self.hostname = hostname
        self.broker_url = broker_url
        self.result_backend = result_backend
        self.pool = pool
        self.concurrency = concurrency
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.cwd = cwd
        #: Inherited by every process this worker forks; see :func:`marked_pids`.
        self.marker = marker or uuid.uuid4().hex
        self.log_path = Path(log_dir) / f"{hostname.replace('@', '_')}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        #: Where this run's output starts in the log, which a restarted worker appends to.
        self._log_start = 0

    @property
    def argv(self) -> list[str]:
        """The worker's command line.

        ``-b`` (and ``--result-backend``) win over what the app names in its code: Celery turns
        them into ``CELERY_BROKER_URL`` (``CELERY_RESULT_BACKEND``), read before the app's conf.
        """
        backend = ["--result-backend", self.result_backend] if self.result_backend else []
        return [
            sys.executable, "-m", "celery", "-A", self.app_module, "-b", self.broker_url, *backend, "worker",
            "-n", self.hostname, "-P", self.pool, "-c", str(self.concurrency), "-l", "INFO",
            *self.extra_args,
        ]  # fmt: skip

    @property
    def pid(self) -> int:
        """Process id of the worker's main process."""
        return self._proc_or_fail().pid

    @property
    def returncode(self) -> int | None:
        """Exit code (negative signal number if killed), or ``None`` while it runs."""
        return None if self._proc is None else self._proc.poll()

    @property
    def alive(self) -> bool:
        """Whether the worker's main process is running."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def environ(self) -> dict[str, str]:
        """The worker's environment: this process's, ``env``, the broker, and the orphan marker."""
        return {
            **os.environ,
            "FORSETI_BROKER_URL": self.broker_url,
            "PYTHONUNBUFFERED": "1",
            **self.env,
            # An app's own broker_read_url / broker_write_url would win over ``-b``; these do not.
            "CELERY_BROKER_READ_URL": self.broker_url,
            "CELERY_BROKER_WRITE_URL": self.broker_url,
            MARKER_ENV: f"{self.marker}:{self.hostname}",
        }

    def start(self) -> WorkerProcess:
        """Start the worker process (does not wait for it to be ready)."""
        if self._proc is not None:
            raise ClusterError(f"worker {self.hostname} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
            self._log_start = log.tell()
            self._proc = subprocess.Popen(
                self.argv,
                env=self.environ,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def log_text(self) -> str:
        """Everything the worker has written so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the worker's log."""
        return _tail(self.log_text(), lines)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the worker logs ``<hostname> ready.``.

        Raises :class:`ClusterError` with the log tail if it exits first or ``timeout`` passes.
        """
        ready = re.compile(rf"\b{re.escape(self.hostname)} ready\.".encode())
        deadline = time.monotonic() + timeout
        while not ready.search(self._this_run_output()):
            if not self.alive:
                raise ClusterError(
                    f"worker {self.hostname} exited with code {self.returncode} before "
                    f"it was ready; log tail:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise ClusterError(f"worker {self.hostname} not ready within {timeout} s; log tail:\n{self.log_tail()}")
            time.sleep(0.05)

    def _this_run_output(self) -> bytes:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_start)
                return fh.read()
        except FileNotFoundError:
            return b""

    def restart(self, timeout: float = 15.0, ready_timeout: float = 60.0) -> None:
        """Stop the worker (as :meth:`stop`), start it again under the same name, wait until ready."""
        self.stop(timeout)
        self._proc = None
        self.start()
        self.wait_ready(ready_timeout)

    def descendants(self) -> list[int]:
        """Pids of the worker's live descendant processes (its pool, keyed processes, ...)."""
        return descendants_of(self.pid) if self.alive else []

    def stop(self, timeout: float = 15.0) -> int | None:
        """Warm shutdown (SIGTERM); SIGKILL if still running after ``timeout`` seconds.

        Returns the exit code. Safe to call on a worker that already exited.
        """
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return self._proc.returncode

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the worker's main process; for SIGKILL, also reap it."""
        self._proc_or_fail().send_signal(sig)
        if sig == signal.SIGKILL:
            self._proc_or_fail().wait()

    def _proc_or_fail(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise ClusterError(f"worker {self.hostname} was never started")
        return self._proc

    def __repr__(self) -> str:
        state = "not started" if self._proc is None else f"pid={self._proc.pid} rc={self.returncode}"
        return f"<WorkerProcess {self.hostname} {state}>"
