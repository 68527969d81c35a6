"""The per-process model host: set up once before the worker consumes anything.

The threads pool runs tasks concurrently. Each task thread hands its job's raw
input to the model, which runs with its dynamic batcher in a spawned child
process (workers/modelproc.py: the forward then does not share a GIL with
Celery), and writes through one group-commit writer (workers/writer.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from core.batcher import BatcherConfig, DynamicBatcher
from core.config import Settings
from core.metrics import BatchMetrics
from core.model import check_labels
from core.store import make_engine, session_factory
from workers.writer import GroupWriter

log = logging.getLogger("mmq.worker")


class InProcessModel:
    """The model and batcher in the worker process itself (``MMQ_MODEL_PROCESS=false``):
    same interface as ``ModelProcess``; for debugging and for comparison."""

    def __init__(self, settings: Settings, device: str | None, metrics: BatchMetrics):
        import torch

        from core.model import MultimodalModel

        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        self.model = MultimodalModel.load(device=device, settings=settings)
        self.version, self.device = self.model.version, str(self.model.device)
        self.cfg = BatcherConfig.for_device(
            self.model.device, max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms)
        self.metrics = metrics
        self.batcher = DynamicBatcher(self.model, self.cfg, metrics)

    def submit(self, modality: str, payload: object, *, labels: list[str] | None,
               top_k: int, deadline: float | None) -> Future:
        prepared = self.model.prepare(modality, payload)  # InvalidInput for bad input
        return self.batcher.submit(modality, prepared, labels=labels, top_k=top_k,
                                   deadline=deadline)

    def close(self) -> None:
        self.batcher.stop()


@dataclass
class ModelHost:
    settings: Settings
    model: object  # ModelProcess or InProcessModel: version, device, cfg, submit
    metrics: BatchMetrics
    sessions: object  # sessionmaker
    writer: GroupWriter
    # SQLite takes one writer at a time; writers in this process queue on this lock
    # rather than in SQLite's busy handler (sleeps of up to 100 ms). None on PostgreSQL.
    write_lock: threading.Lock | None = None

    @contextmanager
    def tx(self):
        """A transaction (committed on exit), serialised per process on SQLite."""
        with self.write_lock or nullcontext(), self.sessions.begin() as s:
            yield s

    def run(self, modality: str, task: str, payload: object, params: dict,
            deadline: float | None = None) -> dict:
        """One job through the batcher -> the prediction fields for the store.
        Raises InvalidInput for bad input, DeadlineExceeded if it waited too long."""
        labels = check_labels(params.get("labels") or []) if task == "classify" else None
        fut = self.model.submit(modality, payload, labels=labels,
                                top_k=int(params.get("top_k", 5)), deadline=deadline)
        # Bounded, so a wedged device cannot hold a task thread (and its message)
        # forever: the job fails and the message is acknowledged.
        return fut.result(timeout=max(60.0, self.settings.visibility_timeout / 2))

    def close(self) -> None:
        self.model.close()


def _log_metrics(metrics: BatchMetrics, every: float) -> None:
    while True:
        time.sleep(every)
        log.info("batching %s", json.dumps(metrics.summary()))


_HOST: ModelHost | None = None


def init_host(settings: Settings, device: str | None = None, *, modality: str = "text",
              worker: str = "worker") -> ModelHost:
    global _HOST
    metrics = BatchMetrics()
    from workers.exporter import start_exporter

    start_exporter(settings.worker_metrics_port, worker, modality, metrics)
    if settings.model_process:
        from workers.modelproc import ModelProcess

        model = ModelProcess(settings, device or settings.device, metrics)
    else:
        model = InProcessModel(settings, device or settings.device, metrics)
    if settings.metrics_log_every_s > 0:
        threading.Thread(target=_log_metrics, args=(metrics, settings.metrics_log_every_s),
                         daemon=True, name="mmq-metrics-log").start()
    log.info("batching: %s", model.cfg)
    engine = make_engine(settings.db_url)
    lock = threading.Lock() if engine.dialect.name == "sqlite" else None
    sessions = session_factory(engine)
    _HOST = ModelHost(settings, model, metrics, sessions, GroupWriter(sessions, lock), lock)
    return _HOST


def host() -> ModelHost:
    if _HOST is None:
        raise RuntimeError("the model host is not initialised; start workers with "
                           "`mmq worker <modality>`")
    return _HOST
