"""The Celery app: JSON only, late acknowledgement, one queue per modality, and the
worker's job count in its reply to Celery's stats broadcast (`mmq top` reads it)."""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from celery import Celery, bootsteps
from celery.worker.consumer import Consumer
from vine import promise

from core.broker.apps import celery_conf
from core.broker.stats import WorkerJobStats
from core.config import Settings, get_settings
from workers import poison

if TYPE_CHECKING:
    from core.serving.runtime import WorkerRuntime


class MmqCelery(Celery):
    """Celery's app, holding the serving runtime (model host and lease) that a worker
    process's tasks run on. The worker's entry point builds it and attaches it before
    consuming (workers/__main__.py); a process that only sends tasks has none."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._runtime: WorkerRuntime | None = None

    def attach_runtime(self, runtime: WorkerRuntime) -> None:
        self._runtime = runtime

    @property
    def attached_runtime(self) -> WorkerRuntime | None:
        return self._runtime

    @property
    def runtime(self) -> WorkerRuntime:
        if self._runtime is None:
            raise RuntimeError("the model host is not initialised; start workers with "
                               "`mmq worker <modality>`")
        return self._runtime


class EventBatchingConsumer(Consumer):
    """Celery's consumer with two changes.

    Poison messages (workers/poison.py): the task-message handler is guarded, so a
    message that is not a valid mmq task is dead-lettered instead of stopping the
    worker.

    Publishes buffered task events (for Flower) at most every EVENT_FLUSH_S.

    Celery flushes them on the next turn of its event loop, which under load turns
    once per message fetched: about one Redis PUBLISH per job, a fifth of the
    consumer thread's time in profiles. Waiting a few tens of ms puts the events
    of many jobs into one ``task.multi`` message; Flower sees them that much later.
    """

    EVENT_FLUSH_S = 0.05
    # Reconnecting to the broker: kombu's ensure_connection waits 2, 4, 6 ... 30 s
    # between rounds (Celery passes no interval), so a worker whose primary died came
    # back at the first round after the Sentinels' promotion: 6 s after a SIGKILL that
    # was promoted in 2.3 s (tests/e2e/test_sentinel.py), up to ~12 s late after a
    # promotion at the Sentinels' default 30 s. Rounds every RECONNECT_STEP_S, growing to
    # RECONNECT_MAX_S, find the new primary within a second of its promotion; a round is
    # a Sentinel query and a refused connect, cheap even for a fleet.
    RECONNECT_STEP_S, RECONNECT_MAX_S = 0.5, 5.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._flush_pending = threading.Lock()  # held from schedule to flush
        poison.worker_name = self.hostname

    def ensure_connected(self, conn):
        ensure = conn.ensure_connection
        conn.ensure_connection = functools.partial(
            ensure, interval_start=self.RECONNECT_STEP_S, interval_step=self.RECONNECT_STEP_S,
            interval_max=self.RECONNECT_MAX_S)
        return super().ensure_connected(conn)

    def create_task_handler(self, promise=promise):
        return poison.guard_task_handler(super().create_task_handler(promise), self.app.tasks,
                                         tuple(self.connection_errors))

    def on_send_event_buffered(self) -> None:
        if self.hub and self._flush_pending.acquire(blocking=False):
            # call_soon wakes the loop from any thread; the timer is set in it.
            self.hub.call_soon(self.hub.call_later, self.EVENT_FLUSH_S, self._flush_later)

    def _flush_later(self) -> None:
        self._flush_pending.release()
        self._flush_events()


class JobStatsStep(bootsteps.StartStopStep):
    """Puts the worker's job count into its reply to Celery's ``stats`` broadcast
    (core/broker/stats.py), which `mmq top` reads: Celery's own ``total`` counts task
    messages, and one run_jobs message carries many jobs. Read from the batching
    metrics the host keeps anyway, so the tasks count nothing extra."""

    def info(self, worker) -> dict:
        runtime = worker.app.attached_runtime
        if runtime is None:  # a worker not started by `mmq worker`: no count to give
            return {}
        return WorkerJobStats(jobs=runtime.host.metrics.jobs).to_stats()


GUARDED_TRANSPORTS = {"redis": "workers.poison:GuardedRedisTransport",
                      "sentinel": "workers.poison:GuardedSentinelTransport"}


def make_app(settings: Settings | None = None) -> MmqCelery:
    s = settings or get_settings()
    app = MmqCelery("mmq", broker=s.broker_url, include=["workers.tasks"])
    app.conf.update(
        celery_conf(s),
        # The worker's kombu Redis transport has a channel that dead-letters what is
        # not a message envelope (undecodable bytes, a JSON list): upstream raises out
        # of the event loop. Not Flower's (it reads the broker's kind from the
        # transport name), nor other schemes (rediss).
        **({"broker_transport": GUARDED_TRANSPORTS[scheme]}
           if (scheme := urlparse(s.broker_url.split(";", 1)[0]).scheme) in GUARDED_TRANSPORTS
           else {}),
        worker_consumer="workers.app:EventBatchingConsumer",
        # Reconnect rounds never run out (Celery's default, 100 rounds, is eight minutes
        # at EventBatchingConsumer's reconnect intervals): a worker waits out a broker
        # outage of any length, then carries on, instead of exiting.
        broker_connection_max_retries=None,
    )
    app.steps["worker"].add(JobStatsStep)
    return app


app = make_app()
