"""Per-worker batching metrics: histograms and counters, logged periodically.

Written by the batcher's threads, one at a time; read (approximately) by the
logger thread.
Kept dependency-free so that an exporter can publish the same numbers later.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 65536)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.total += v
        self.n += 1

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0


@dataclass
class BatchMetrics:
    batch_size: Histogram = field(default_factory=lambda: Histogram(SIZE_BUCKETS))
    batch_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))
    queue_wait_s: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))
    model_s: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))
    jobs: int = 0
    dropped: int = 0  # past their deadline when a batch formed
    late: int = 0  # outcomes of attempts that no longer held their job (the fence)
    started: float = field(default_factory=time.monotonic)
    # Called with each observation as well (a Prometheus exporter, or the pipe from a
    # model child process to its parent): objects with observe_batch(**kw) and
    # observe_dropped(modality, n).
    sinks: list = field(default_factory=list)

    def observe_batch(self, *, modality: str, size: int, tokens: int, model_s: float,
                      waits_s: list[float]) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(tokens)
        self.model_s.observe(model_s)
        for w in waits_s:
            self.queue_wait_s.observe(w)
        self.jobs += size
        for sink in self.sinks:
            sink.observe_batch(modality=modality, size=size, tokens=tokens, model_s=model_s,
                               waits_s=waits_s)

    def observe_dropped(self, modality: str, n: int = 1) -> None:
        self.dropped += n
        for sink in self.sinks:
            sink.observe_dropped(modality, n)

    def observe_late(self, modality: str, n: int = 1) -> None:
        """Only the worker's host observes these (the store's fence answers there)."""
        self.late += n
        for sink in self.sinks:
            if hasattr(sink, "observe_late"):  # the model child's pipe has no such event
                sink.observe_late(modality, n)

    def summary(self) -> dict:
        elapsed = max(1e-9, time.monotonic() - self.started)
        return {
            "jobs": self.jobs, "batches": self.batch_size.n, "dropped": self.dropped,
            "late_outcomes_dropped": self.late,
            "mean_batch_size": round(self.batch_size.mean, 2),
            "mean_batch_tokens": round(self.batch_tokens.mean, 1),
            "mean_queue_wait_ms": round(1e3 * self.queue_wait_s.mean, 2),
            "mean_model_ms": round(1e3 * self.model_s.mean, 2),
            "jobs_per_s": round(self.jobs / elapsed, 2),
        }
