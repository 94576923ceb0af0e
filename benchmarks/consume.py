"""What a ``ConsumerLoop`` costs per message on Redis, in a tight loop (issue 15): kombu's own event
loop against forseti's reads without it (``core/transport/redis_consume``), run in turns.

``python -m benchmarks.consume [--url redis://127.0.0.1:6379/0] [--messages 5000] [--rounds 3]``:
a list holds ``messages`` copies of one kombu envelope (a one-message forseti batch) before the
consumer starts; from the first message handled to the last, per message: the wall time, and the
CPU time of the consumer thread (the figure a shared machine's load moves least).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid

import redis
from celery import Celery
from kombu import Exchange, Producer, Queue

from forseti_celery.core.broker import RestartIntensity
from forseti_celery.core.codec import CONTENT_ENCODING, CONTENT_TYPE, encode
from forseti_celery.core.consumer import ConsumerLoop
from forseti_celery.core.transport import redis_consume


def _fill(app: Celery, url: str, queue: Queue, count: int) -> None:
    with app.connection_for_write() as conn:
        Producer(conn.default_channel).publish(
            encode([{"t": "x", "i": 0}]), exchange=queue.exchange, routing_key=queue.routing_key,
            content_type=CONTENT_TYPE, content_encoding=CONTENT_ENCODING)
    with redis.Redis.from_url(url) as r:
        raw = r.rpop(queue.name)
        pipe = r.pipeline(transaction=False)
        for _ in range(count):
            pipe.lpush(queue.name, raw)
        pipe.execute()


def per_message_us(url: str, count: int, fast: bool) -> tuple[float, float]:
    """µs per message (wall, the consumer thread's CPU) of a ``ConsumerLoop`` draining ``count`` waiting
    messages."""
    app = Celery("consume-bench", broker=url, set_as_current=False)
    name = f"forseti-bench-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(""), routing_key=name, auto_delete=True)
    _fill(app, url, queue, count)
    stamps: list[tuple[float, float]] = []
    done = threading.Event()

    def handle(batch: list[object]) -> None:
        stamps.append((time.perf_counter(), time.thread_time()))
        if len(stamps) == count:
            done.set()

    with redis_consume.KOMBU_REDIS_CONSUME.forced(fast):
        loop = ConsumerLoop("bench-consume", app.connection_for_read, lambda: [queue], handle,
                            intensity=RestartIntensity(3, 10))
        loop.start()
        try:
            if not done.wait(300):
                raise RuntimeError(f"handled {len(stamps)} of {count}")
        finally:
            loop.stop()
    (wall0, cpu0), (wall1, cpu1) = stamps[0], stamps[-1]
    return (wall1 - wall0) / (count - 1) * 1e6, (cpu1 - cpu0) / (count - 1) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"kombu": [], "fast": []}
    for _ in range(args.rounds):
        for label, fast in (("kombu", False), ("fast", True)):
            results[label].append(per_message_us(args.url, args.messages, fast))
    for label, values in results.items():
        for i, what in enumerate(("wall", "cpu")):
            column = [v[i] for v in values]
            print(f"{label:>6} {what}: median {statistics.median(column):.1f} µs/message "
                  f"({', '.join(f'{v:.1f}' for v in column)})")


if __name__ == "__main__":
    main()
