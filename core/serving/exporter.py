"""Per-worker Prometheus exporter of the batching metrics.

A sink of ``core.serving.metrics.BatchMetrics``: every batch the worker's batcher runs
(in the model child process, replayed in the parent) is observed here as well.
Each worker process serves its own port (``MMQ_WORKER_METRICS_PORT``; 0 = off), on
loopback unless ``MMQ_WORKER_METRICS_HOST`` says otherwise (compose: 0.0.0.0, inside
its private network).
"""

from __future__ import annotations

import errno
import logging

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from core.broker import deadletter
from core.serving.metrics import SECONDS_BUCKETS, SIZE_BUCKETS, TOKEN_BUCKETS, BatchMetrics

log = logging.getLogger("mmq.worker")
LABELS = ("modality", "worker")


class PrometheusSink:
    def __init__(self, worker: str, modality: str, metrics: BatchMetrics,
                 registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)  # RSS, CPU seconds, open fds
        r, self.worker = self.registry, worker
        self.server = None  # the HTTP server, once start_exporter has started it
        self.batch_size = Histogram("mmq_batch_size", "Jobs per model forward", LABELS,
                                    buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("mmq_batch_tokens", "Real tokens (patches, frames) "
                                      "per model forward", LABELS, buckets=TOKEN_BUCKETS,
                                      registry=r)
        self.queue_wait = Histogram("mmq_queue_wait_seconds", "Time a job waited in the "
                                    "batcher before its forward began", LABELS,
                                    buckets=SECONDS_BUCKETS, registry=r)
        self.model_time = Histogram("mmq_model_seconds", "Model time per batch (forward and "
                                    "scores)", LABELS, buckets=SECONDS_BUCKETS, registry=r)
        self.jobs = Counter("mmq_jobs", "Jobs through the model", LABELS, registry=r)
        self.dropped = Counter("mmq_dropped_jobs", "Jobs dropped past their deadline when a "
                               "batch formed", LABELS, registry=r)
        self.late = Counter("mmq_late_outcomes_dropped", "Outcomes (results, failures) of "
                            "attempts that no longer held their job, refused by the store's "
                            "fence: the job was cancelled or handed to another attempt",
                            LABELS, registry=r)
        self.dead_letters = Counter("mmq_dead_letters", "Messages that were not valid mmq "
                                    "tasks, moved to the dead-letter list", LABELS + ("reason",),
                                    registry=r)
        self.modality = modality
        # Lifetime average; rate(mmq_jobs_total[1m]) gives a recent one.
        Gauge("mmq_jobs_per_second", "Jobs per second since the worker started", ["worker"],
              registry=r).labels(worker).set_function(
                  lambda: metrics.jobs / max(1e-9, _elapsed(metrics)))
        # Series exist from the start (a scraper sees 0, not nothing, before a job).
        for m in (self.batch_size, self.batch_tokens, self.queue_wait, self.model_time,
                  self.jobs, self.dropped, self.late):
            m.labels(modality, worker)
        for reason in deadletter.REASONS:
            self.dead_letters.labels(modality, worker, reason)

    def observe_batch(self, *, modality: str, size: int, tokens: int, model_s: float,
                      waits_s: list[float]) -> None:
        lab = (modality, self.worker)
        self.batch_size.labels(*lab).observe(size)
        self.batch_tokens.labels(*lab).observe(tokens)
        self.model_time.labels(*lab).observe(model_s)
        wait = self.queue_wait.labels(*lab)
        for w in waits_s:
            wait.observe(w)
        self.jobs.labels(*lab).inc(size)

    def observe_dropped(self, modality: str, n: int) -> None:
        self.dropped.labels(modality, self.worker).inc(n)

    def observe_late(self, modality: str, n: int) -> None:
        self.late.labels(modality, self.worker).inc(n)

    def observe_dead_letter(self, entry: deadletter.DeadLetter) -> None:
        # Labelled with the worker's modality, not the entry's queue: a queue name
        # read from a malformed message is not a bounded label value.
        self.dead_letters.labels(self.modality, self.worker, entry.reason).inc()


def _elapsed(metrics: BatchMetrics) -> float:
    import time

    return time.monotonic() - metrics.started


def start_exporter(port: int, worker: str, modality: str, metrics: BatchMetrics, *,
                   host: str = "127.0.0.1") -> PrometheusSink | None:
    """Serve /metrics on ``host:port`` and attach the sink to ``metrics``. Loopback by
    default: nothing listens wider than it must, and a scraper on another host is a
    deployment's explicit choice (MMQ_WORKER_METRICS_HOST). A taken port is logged,
    never fatal: the worker serves jobs without its exporter rather than not at all."""
    if port <= 0:
        return None
    sink = PrometheusSink(worker, modality, metrics)
    try:
        sink.server, _ = start_http_server(port, addr=host, registry=sink.registry)
    except OSError as e:
        why = "is already in use" if e.errno == errno.EADDRINUSE else f"failed: {e}"
        log.error("metrics exporter: port %d %s; this worker runs without one (give each "
                  "worker process its own MMQ_WORKER_METRICS_PORT, or 0 for none)", port, why)
        return None
    metrics.sinks.append(sink)
    log.info("metrics exporter: http://%s:%d/metrics", host, port)
    return sink
