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
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from core.serving.drain import Drain

log = logging.getLogger("mmq.worker")


class AckBatcher:
    """``ack(tag)`` from any thread; ``write(tags)`` runs the group's transaction and
    ``done(tag)`` marks each tag acknowledged once it is written."""

    def __init__(self, write: Callable[[list], None], done: Callable[[object], None]):
        self._write, self._done = write, done
        self._queue: Drain[object] = Drain()
        self._lock = threading.Lock()  # one group written at a time (thread or flush)
        self._thread: threading.Thread | None = None

    def ack(self, tag) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, daemon=True,
                                                    name="mmq-acks")
                    self._thread.start()
        self._queue.put(tag)

    def flush(self) -> None:
        """Write what is queued now, in the calling thread (a closing channel)."""
        with self._lock:
            tags = self._queue.take_nowait()
            if tags:
                self._commit(tags)

    def _loop(self) -> None:
        while True:
            tags = self._queue.take()
            with self._lock:
                self._commit(tags)

    def _commit(self, tags: list) -> None:
        try:
            self._write(tags)
        except Exception as e:  # noqa: BLE001  (as kombu's ack_log_error: logged, and the
            # messages stay unacknowledged, to be redelivered and found finished)
            log.error("could not acknowledge %d message(s): %s: %s", len(tags),
                      type(e).__name__, e)
            return
        for tag in tags:
            self._done(tag)
