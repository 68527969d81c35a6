"""Prometheus metrics of the API process, computed from SQL and Redis at scrape time.

Jobs by status and modality come from the store, so any API replica reports the
whole fleet's numbers (scrape one replica, or aggregate with ``max``). The
submit-to-result histogram counts each job once per API process, reading jobs
finished since its previous scrape; it starts empty when the process starts.
"""

from __future__ import annotations

import bisect
import logging
import threading

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from core import store
from core.broker import deadletter
from core.broker.sender import queue_depths
from core.config import Settings
from core.errors import brief_error
from core.jobs import QUEUES, TERMINAL, JobStatus

log = logging.getLogger("mmq.api")
TERMINAL_STATUSES = sorted(TERMINAL)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class StoreCollector:
    def __init__(self, settings: Settings, client, redis_client: redis.Redis):
        self.settings, self.client, self.redis = settings, client, redis_client
        self._lock = threading.Lock()  # scrapes may overlap; the watermark must not
        # Where the latency histogram starts: the database's clock now (finished_at is
        # stamped by it; this API host's clock may be off), or at the first scrape if
        # the store does not answer yet.
        self._seen_until = None
        try:
            with client.sessions() as s:
                self._seen_until = store.db_time(session=s)
        except Exception as e:  # noqa: BLE001  (the API starts without its store)
            log.warning("latency histogram starts at the first scrape: %s", brief_error(e))
        # (modality, status) -> [per-bucket counts ..., +Inf], sum
        self._hist: dict[tuple[str, str], tuple[list[int], list[float]]] = {}

    def collect(self):
        yield from self._store_metrics()
        yield from self._queue_metrics()

    def _store_metrics(self):
        """Everything read from SQL: one query per family, on the database's clock.
        A store that does not answer gives ``mmq_store_up 0`` and no other store
        family (an absent series, not a zero that would look like an empty queue)."""
        up = GaugeMetricFamily("mmq_store_up", "1 if the SQL store answered this scrape")
        try:
            with self.client.sessions() as s:
                counts = store.count_by_status(session=s)
                live = store.live_workers_by_modality(session=s, lease_s=self.settings.lease_s)
                now = store.db_time(session=s)
                oldest = store.oldest_active(session=s)
                cancelled_running = store.cancelled_while_running(session=s)
                hooks = store.webhook_counts(session=s)
                with self._lock:
                    self._observe_finished(s)
                    hist = {k: (list(c), t[0]) for k, (c, t) in self._hist.items()}
        except Exception as e:  # noqa: BLE001  (any store error is "the store is down")
            # One line, without SQLAlchemy's statement and parameters: every scrape
            # of an outage repeats it.
            log.warning("metrics: store unreachable: %s", brief_error(e))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("mmq_jobs", "Jobs in the store, by modality and status",
                                 labels=["modality", "status"])
        for (m, st), n in sorted(counts.items()):
            jobs.add_metric([m, st], n)
        yield jobs
        # The store's terminal rows only ever grow (no job is deleted), so they are a
        # counter: rate() gives the fleet's finishing rate from any API replica.
        finished = CounterMetricFamily(
            "mmq_jobs_finished", "Jobs that reached a final status, by modality and status",
            labels=["modality", "status"])
        for m in QUEUES:
            for st in TERMINAL_STATUSES:
                finished.add_metric([m, st], counts.get((m, st), 0))
        yield finished
        cancelled = CounterMetricFamily(
            "mmq_jobs_cancelled_while_running", "Jobs cancelled after a worker had started "
            "them (that attempt's outcome is dropped)", labels=["modality"])
        workers = GaugeMetricFamily(
            "mmq_live_workers", "Worker processes whose lease is live (database clock)",
            labels=["modality"])
        age = GaugeMetricFamily(
            "mmq_oldest_job_age_seconds", "Age of the oldest queued job (since submit) and of "
            "the oldest running job (since its start); 0 when there is none",
            labels=["modality", "status"])
        for m in QUEUES:
            cancelled.add_metric([m], cancelled_running.get(m, 0))
            workers.add_metric([m], live.get(m, 0))
            for st in (JobStatus.QUEUED.value, JobStatus.RUNNING.value):
                at = oldest.get((m, st))
                age.add_metric([m, st], 0.0 if at is None else max(0.0, (now - at).total_seconds()))
        yield cancelled
        yield workers
        yield age
        deliveries = GaugeMetricFamily(
            "mmq_webhook_deliveries", "Webhook events not delivered: pending (due or "
            "waiting to retry), failing (pending after a failed attempt), failed (gave up)",
            labels=["state"])
        for state, n in hooks.items():
            deliveries.add_metric([state], n)
        yield deliveries
        lat = HistogramMetricFamily(
            "mmq_job_latency_seconds", "Submit to result (finished jobs), by modality and "
            "final status; counted since this API process started", labels=["modality", "status"])
        for (m, st), (c, total) in sorted(hist.items()):
            cum, buckets = 0, []
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), c, strict=True):
                cum += n
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cum))
            lat.add_metric([m, st], buckets, total)
        yield lat

    def _observe_finished(self, session) -> None:
        if self._seen_until is None:
            self._seen_until = store.db_time(session=session)
        rows = store.finished_since(session=session, after=self._seen_until)
        for modality, status, created, finished in rows:
            counts, total = self._hist.setdefault(
                (modality, status), ([0] * (len(LATENCY_BUCKETS) + 1), [0.0]))
            seconds = max(0.0, (finished - created).total_seconds())
            counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            total[0] += seconds
        if rows:
            self._seen_until = rows[-1][3]

    def _queue_metrics(self):
        up = GaugeMetricFamily("mmq_broker_up", "1 if Redis answered this scrape")
        depth = GaugeMetricFamily("mmq_queue_depth", "Messages waiting in each modality's "
                                  "queue (fetched, unacknowledged ones not counted)",
                                  labels=["modality"])
        dead = GaugeMetricFamily("mmq_dead_letters_waiting", "Messages in the dead-letter "
                                 "list, waiting for an operator (mmq dead)")
        try:
            for m, n in queue_depths(self.settings, QUEUES, client=self.redis).items():
                depth.add_metric([m], n)
            dead.add_metric([], deadletter.count(self.redis))
            up.add_metric([], 1)
        except redis.RedisError as e:
            log.warning("metrics: Redis unreachable: %s", brief_error(e))
            up.add_metric([], 0)
            yield up
            return
        yield up
        yield depth
        yield dead


def metrics_registry(settings: Settings, client, redis_client: redis.Redis
                     ) -> CollectorRegistry:
    """A registry of this app's own (not the process-global one): two apps in one
    process, as in the tests, do not collide."""
    reg = CollectorRegistry()
    reg.register(StoreCollector(settings, client, redis_client))
    return reg


def render_metrics(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST
