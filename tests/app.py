"""The Celery app the test suite's real workers run (``celery -A tests.app worker``)."""

from __future__ import annotations

import gc
import json
import os
import signal
import struct
import time
from typing import Any

from celery import Celery

import forseti_celery
import forseti_celery.child.runtime
from forseti_celery import Forseti, KeyedProcess
from tests.cluster_conf import cluster_conf

app = Celery("tests", broker=os.environ.get("FORSETI_BROKER_URL"), backend="rpc://", set_as_current=True)
app.conf.update(cluster_conf(spares=2))
if os.environ.get("FORSETI_FS_FOLDER"):  # the filesystem transport, which forseti must refuse
    folder = os.environ["FORSETI_FS_FOLDER"]
    app.conf.broker_transport_options = {"data_folder_in": folder, "data_folder_out": folder}
if os.environ.get("FORSETI_NODES"):
    app.conf.forseti_nodes = os.environ["FORSETI_NODES"].split(",")
if os.environ.get("FORSETI_MAILBOX_LIMIT"):
    app.conf.forseti_mailbox_limit = int(os.environ["FORSETI_MAILBOX_LIMIT"])
if os.environ.get("FORSETI_MAX_MESSAGE_SIZE"):
    app.conf.forseti_max_message_size = int(os.environ["FORSETI_MAX_MESSAGE_SIZE"])
if os.environ.get("FORSETI_WORKER_SECRET"):  # a list when rotating: "new,old"
    secrets = os.environ["FORSETI_WORKER_SECRET"].split(",")
    app.conf.forseti_worker_secret = secrets[0] if len(secrets) == 1 else secrets
forseti = Forseti(app)


def journal(event: str, key: str, **fields: Any) -> None:
    """Record a start or an end, from the keyed process itself, for the invariant checks."""
    folder = os.environ.get("FORSETI_JOURNAL")
    if folder:
        line = json.dumps({"ev": event, "key": key, "pid": os.getpid(), "t": time.time(), **fields})
        with open(os.path.join(folder, f"{os.getpid()}.jsonl"), "a") as f:
            f.write(line + "\n")


@forseti.keyed
class Counter(KeyedProcess):
    """Holds a number; answers calls, counts casts."""

    def init(self, key: str, start: int = 0, *rest: Any) -> None:
        self.key = key
        self.value = start
        self.seen: list[Any] = []
        journal("start", key, args=[start, *rest])

    def handle_call(self, msg: Any) -> Any:
        if msg == "get":
            return self.value
        if msg == "seen":
            return self.seen
        if msg == "pid":
            return os.getpid()
        if msg == "gc":
            return gc.isenabled()
        if msg == "key":
            return self.key
        if msg == "crash":
            raise ValueError("asked to crash")
        if msg == "exit":
            os._exit(3)
        if isinstance(msg, dict) and "raise" in msg:  # a BaseException that is no Exception
            raise {"KeyboardInterrupt": KeyboardInterrupt, "GeneratorExit": GeneratorExit,
                   "SystemExit": SystemExit}[msg["raise"]](*msg.get("args", []))
        if isinstance(msg, dict) and "nest" in msg:  # an answer nested msg["nest"] lists deep
            value: Any = 0
            for _ in range(msg["nest"]):
                value = [value]
            return value
        if isinstance(msg, dict) and "big" in msg:  # an answer of msg["big"] characters
            return "x" * msg["big"]
        if msg == "count":
            return len(self.seen)
        if isinstance(msg, dict) and "sleep" in msg:
            time.sleep(msg["sleep"])
            return "slept"
        return ["echo", msg]

    def handle_cast(self, msg: Any) -> None:
        self.seen.append(msg)
        if msg == "inc":
            self.value += 1
        elif msg == "crash":
            raise RuntimeError("cast crash")

    def terminate(self, reason: str) -> None:
        journal("terminate", self.key, reason=reason)


@forseti.keyed(name="slow")
class Slow(Counter):
    """Takes ``seconds`` to start."""

    def init(self, key: str, seconds: float = 5.0, *rest: Any) -> None:
        time.sleep(seconds)
        super().init(key)


@forseti.keyed(name="lingering")
class Lingering(Counter):
    """Takes ``linger`` seconds to ``terminate`` (saving its state, say); journals its end after."""

    def init(self, key: str, linger: float = 1.0, *rest: Any) -> None:
        super().init(key)
        self.linger = linger

    def terminate(self, reason: str) -> None:
        time.sleep(self.linger)
        super().terminate(reason)


@forseti.keyed(name="recorder")
class Recorder(KeyedProcess):
    """Keeps the first item of every cast (``[i, padding]``): answers the call "seen" with them."""

    def init(self, key: str, *args: Any) -> None:
        self.seen: list[Any] = []
        journal("start", key)

    def handle_cast(self, msg: Any) -> None:
        self.seen.append(msg[0] if isinstance(msg, list) else msg)

    def handle_call(self, msg: Any) -> Any:
        return self.seen if msg == "seen" else ["echo", msg]


@forseti.keyed(name="halfway")
class Halfway(Counter):
    """On the call "halfway": writes the first half of a frame to its pipe, stops itself
    (SIGSTOP) there, and once continued (SIGCONT) writes the rest and answers "done"."""

    def handle_call(self, msg: Any) -> Any:
        if msg != "halfway":
            return super().handle_call(msg)
        body = json.dumps([{"t": "note", "pad": "x" * 2000}]).encode()
        frame = struct.pack("!i", len(body)) + body
        fd = forseti_celery.child.runtime.mailbox()._conn.fileno()
        os.write(fd, frame[:1000])
        os.kill(os.getpid(), signal.SIGSTOP)
        os.write(fd, frame[1000:])
        return "done"


@forseti.keyed(name="failing")
class Failing(KeyedProcess):
    """``init`` always raises."""

    def init(self, key: str, *args: Any) -> None:
        raise ValueError(f"cannot start {key}")


@forseti.keyed(name="poller")
def poll_device(key: str, interval: float = 0.05) -> None:
    """Function form: lives until it receives "stop" (or returns on "return"/raises on "raise")."""
    journal("start", key)
    try:
        while (msg := forseti_celery.receive(timeout=interval)) != "stop":
            if msg == "raise":
                raise RuntimeError("poller failed")
            if msg == "exit":
                os._exit(4)
    finally:
        journal("end", key)


@app.task
def lookup(key: str) -> Any:
    """get_key from inside a task: the ref travels back as a task result (JSON)."""
    return forseti_celery.get_key(key)


@app.task
def call_ref(ref: Any, msg: Any) -> Any:
    """Use a ref that arrived as a task argument."""
    return [type(ref).__name__, ref.call(msg)]
