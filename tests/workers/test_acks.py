"""Acknowledgements that cannot be written (workers/acks.py, ``OwnedQoS`` in
workers/poison.py), with a real redis-server behind bench/faults.py's TcpProxy.

A worker whose primary hung (SIGSTOPped, tests/e2e/test_sentinel.py) had every task
thread's ack fail with a timeout while all its prefetch slots were taken: kombu frees a
slot only once its ack is written, so the consumer never sent another BRPOP, and
nothing in its event loop failed either (kombu's health checks drop the stale
connections quietly), so Celery never restarted it: the worker idled with 180 jobs
queued on the new primary. Here the link is cut (the ack fails at once) while the only
prefetch slot is taken, and brought back."""

from __future__ import annotations

import logging
import threading
import time

import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from core.broker.queues import FETCHED_BY
from workers.poison import GuardedRedisTransport


def _until(condition, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(what)
        time.sleep(0.05)


def _drain_until(conn: Connection, condition, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(what)
        try:
            conn.drain_events(timeout=0.2)
        except (TimeoutError, *conn.connection_errors):
            pass  # nothing yet, or the link is still down: the client reconnects


def test_a_failed_ack_frees_its_prefetch_slot_and_is_written_when_redis_is_back(
        redis_proxy, broker_url, caplog):
    db = broker_url.rsplit("/", 1)[1]
    direct = redis.Redis.from_url(broker_url)
    queue = Queue("acks", Exchange("acks", "direct"), "acks")
    got: list = []
    with Connection(f"redis://127.0.0.1:{redis_proxy.port}/{db}", transport=GuardedRedisTransport,
                    transport_options={"socket_timeout": 5, "socket_connect_timeout": 5}) as conn:
        channel = conn.channel()
        producer = Producer(channel)
        for n in range(2):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key="acks",
                             declare=[queue], serializer="json")
        consumer = Consumer(channel, [queue], accept=["json"],
                            callbacks=[lambda body, message: got.append(message)])
        consumer.qos(prefetch_count=1)
        consumer.consume()
        _drain_until(conn, lambda: len(got) == 1, "the first message was not delivered")
        assert direct.hlen("unacked") == 1 and direct.llen("acks") == 1

        redis_proxy.down()  # every connection cut, new ones refused: the ack cannot be written
        with caplog.at_level(logging.WARNING, logger="mmq.worker"):
            got[0].ack()
            _until(lambda: "could not acknowledge" in caplog.text, "the ack did not fail")
        redis_proxy.up()

        # Before the fix the slot stayed taken for good: no BRPOP, no second message.
        _drain_until(conn, lambda: len(got) == 2, "the failed ack kept the only prefetch "
                     "slot: the consumer never fetched again")
        got[1].ack()
        # The first ack was written too once Redis answered again: nothing is left
        # unacknowledged, to be redelivered after the visibility timeout.
        _until(lambda: (direct.hlen("unacked"), direct.zcard("unacked_index"),
                        direct.hlen(FETCHED_BY)) == (0, 0, 0),
               "an acknowledgement was never written")
        assert direct.llen("acks") == 0


def test_a_failed_group_is_written_again_with_the_acks_queued_since():
    """AckBatcher alone: the slots of a failed group are freed at once, and the group is
    written again (with the acks queued since) until a write succeeds."""
    from workers.acks import AckBatcher

    down = threading.Event()
    tried: list[list] = []
    written: list = []
    done: list = []

    def write(tags):
        tried.append(list(tags))
        if down.is_set():
            raise redis.TimeoutError("Timeout reading from the old primary")
        written.extend(tags)

    batcher = AckBatcher(write, done.append)
    batcher.RETRY_STEP_S = batcher.RETRY_MAX_S = 0.01
    down.set()
    batcher.ack("a")
    _until(lambda: "a" in done, "the failed ack's slot was not freed")
    batcher.ack("b")
    _until(lambda: any(t == ["a", "b"] for t in tried), "the failed group was not tried "
           "again with the ack queued since")
    assert written == []
    down.clear()
    _until(lambda: sorted(written) == ["a", "b"], "the group was not written once Redis "
           "answered")
    batcher.ack("c")
    _until(lambda: "c" in written, "a later ack was not written")
    assert tried[-1] == ["c"] and sorted(written) == ["a", "b", "c"]
    assert sorted(set(done)) == ["a", "b", "c"]
