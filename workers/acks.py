"""Acknowledgements in groups: one Redis transaction for the acks of many jobs.

kombu's Redis transport acknowledges a message with a MULTI/EXEC of its own (remove
it from the unacked hash and index, and here from the fetched-by hash), sent by the
task thread that ran the job: one round trip and a redis-py pipeline per job, a
tenth of the worker's CPU at load (bench/queue_profile.py). Here the task thread
queues the delivery tag and returns; one thread writes whatever queued up while its
last transaction ran as one, then marks the tags acknowledged in kombu's QoS (which
frees their prefetch slots). Nothing waits on a timer: at light load a lone ack
goes at once.

The guarantees are those of kombu's own ack: a task queues its ack only after its
job's outcome is committed (``acks_late``), and an ack that never reaches Redis
(the worker killed in between, the broker gone) leaves the message unacknowledged,
to be redelivered (core/broker/sweep.py, the visibility timeout) and found finished.
A closing channel writes the pending acks first (``flush``), so that it does not
restore messages whose jobs are done.

A group whose write fails (the primary gone, hung or failing over) frees its prefetch
slots at once and is written again, with the acks queued since, every few seconds
until Redis answers (``RETRY_*``). kombu frees a slot only after its ack is written
and counts on the consumer restarting when the broker goes away, which closes the
channel and its QoS. A hung (SIGSTOPped) primary need not fail anything in the
consumer's event loop: kombu's health checks drop its stale connections quietly, and
a consumer whose every slot held a failed ack sent no BRPOP again, on the old primary
or the new one (tests/e2e/test_sentinel.py, "stopped": 180 jobs queued on the new
primary, the event loop idle in epoll, no BRPOP on either server). A message whose
ack is never written stays in the unacked hash until the sweep or the visibility
timeout restores it, and its redelivery finds the job finished.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

from core.serving.drain import Drain

log = logging.getLogger("mmq.worker")


class AckBatcher:
    """``ack(tag)`` from any thread; ``write(tags)`` runs the group's transaction and
    ``done(tag)`` marks each tag acknowledged (frees its prefetch slot) once it is
    written, or once writing it failed (then it is written again later)."""

    # Tries of a failed group: after RETRY_STEP_S, doubling to RETRY_MAX_S, for
    # RETRY_FOR_S in all; long enough for Sentinel to promote a replica at its default
    # down-after-milliseconds (30 s). Each try costs a refused connect or one socket
    # timeout (core/broker/redis_client.py) on the ack thread, nothing elsewhere.
    RETRY_STEP_S, RETRY_MAX_S, RETRY_FOR_S = 0.5, 5.0, 120.0

    def __init__(self, write: Callable[[list], None], done: Callable[[object], None]):
        self._write, self._done = write, done
        self._queue: Drain[object] = Drain()
        self._lock = threading.Lock()  # one group written at a time (thread or flush)
        self._thread: threading.Thread | None = None
        self._retry: list = []  # tags whose write failed, to write again (under _lock)

    def ack(self, tag) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, daemon=True,
                                                    name="mmq-acks")
                    self._thread.start()
        self._queue.put(tag)

    def flush(self) -> None:
        """Write what is queued now, and what is waiting to be written again, in the
        calling thread (a closing channel): one try, the channel is going. Tags that
        fail here are marked done all the same: closing does not restore them (their
        jobs are finished); their unacked entries wait for the sweep."""
        with self._lock:
            tags, self._retry = self._retry + self._queue.take_nowait(), []
            if tags:
                self._commit(tags)

    def _loop(self) -> None:
        failing_since: float | None = None
        delay = self.RETRY_STEP_S
        while True:
            if failing_since is None:
                tags = self._queue.take()
            else:  # the next try of the failed group, with what queued meanwhile
                time.sleep(delay)
                tags = self._queue.take_nowait()
            with self._lock:
                tags, self._retry = self._retry + tags, []
                if not tags:  # a closing channel's flush took them
                    failing_since, delay = None, self.RETRY_STEP_S
                    continue
                if self._commit(tags):
                    failing_since, delay = None, self.RETRY_STEP_S
                    continue
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                else:
                    delay = min(delay * 2, self.RETRY_MAX_S)
                if now - failing_since >= self.RETRY_FOR_S:
                    log.error("gave up acknowledging %d message(s) after %.0f s: left to "
                              "the redelivery, which finds their jobs finished",
                              len(tags), now - failing_since)
                    failing_since, delay = None, self.RETRY_STEP_S
                    continue
                self._retry = tags

    def _commit(self, tags: list) -> bool:
        """Write the group, then mark its tags done; True if the write succeeded. A
        failed write marks them done as well (their slots must not wait on a broker
        that may never answer on this connection again) and is for the caller to try
        again."""
        try:
            self._write(tags)
        except Exception as e:  # noqa: BLE001  (as kombu's ack_log_error: logged; the
            # messages stay unacknowledged in Redis until a later try writes them)
            log.warning("could not acknowledge %d message(s): %s: %s", len(tags),
                        type(e).__name__, e)
            ok = False
        else:
            ok = True
        for tag in tags:
            self._done(tag)
        return ok


@contextmanager
def after_teardown(channel, what: str):
    """An ack (or reject) of a task that finished after its connection was torn down
    (the broker failed over or restarted while the task ran): kombu builds a client
    from ``connection.client``, which the teardown set to None, and the AttributeError
    escaped into Celery's event loop and stopped every worker of a Sentinel failover
    (bench/cluster.py). Nothing is lost by letting it go: kombu restored the channel's
    unacknowledged messages when it closed it (or the sweep will), and the job's
    outcome is in the store, so its redelivery finds it finished."""
    try:
        yield
    except AttributeError:
        if getattr(channel.connection, "client", None) is not None:
            raise
        log.warning("%s after the broker connection was torn down: left to the "
                    "redelivery, which finds the job finished", what)
