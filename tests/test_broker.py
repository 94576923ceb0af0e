"""The broker plumbing on real brokers: the consumer thread and the publisher."""

from __future__ import annotations

import threading
import time
import uuid

from celery import Celery
from kombu import Exchange, Queue

from forseti_celery.broker import ConsumerLoop, Publisher, RestartIntensity
from forseti_celery.testing import wait_for


def test_a_queue_added_to_a_loop_that_has_served_for_a_while_is_consumed(broker_url: str) -> None:
    # A Redis leader elected after start-up adds the leader queue to a loop already running: it
    # must be consumed, not silently ignored (the new leader would never answer).
    app = Celery("broker-test", broker=broker_url, set_as_current=False)
    tag = uuid.uuid4().hex[:8]
    exchange = Exchange("", type="direct")
    first = Queue(f"forseti-t-{tag}-a", exchange, routing_key=f"forseti-t-{tag}-a", auto_delete=True)
    later = Queue(f"forseti-t-{tag}-b", exchange, routing_key=f"forseti-t-{tag}-b", auto_delete=True)
    received: list[object] = []
    add = threading.Event()

    def tick() -> None:
        if add.is_set():
            loop.add_queue(later)

    loop = ConsumerLoop("test-loop", app.connection_for_read, lambda: [first], received.extend,
                        intensity=RestartIntensity(3, 10), tick=tick, interval=0.05)
    publisher = Publisher(app.connection_for_write())
    loop.start()
    try:
        assert loop.connected.wait(10)
        publisher.publish(exchange, first.routing_key, [{"t": "one"}])
        wait_for(lambda: received == [{"t": "one"}], 10, 0.02, "the first queue was not consumed")
        time.sleep(0.3)  # several rounds of the event loop
        add.set()
        publisher.publish(exchange, later.routing_key, [{"t": "two"}], declare=[later])
        wait_for(lambda: {"t": "two"} in received, 10, 0.02, "the queue added later was never consumed")
    finally:
        loop.stop()
        publisher.close()
