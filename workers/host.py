"""The per-process model host: loaded once before the worker consumes anything.

The threads pool runs tasks concurrently. Each task thread preprocesses its own
item (no model weights involved) and hands it to the dynamic batcher, whose one
thread owns the model and the device.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from core.batcher import BatcherConfig, DynamicBatcher
from core.config import Settings
from core.model import MultimodalModel, check_labels
from core.store import make_engine, session_factory

log = logging.getLogger("mmq.worker")


@dataclass
class ModelHost:
    settings: Settings
    model: MultimodalModel
    sessions: object  # sessionmaker
    batcher: DynamicBatcher
    # SQLite takes one writer at a time; dozens of task threads colliding on its
    # file lock back off in sleeps of up to 100 ms each (its busy handler). Queuing
    # them on a lock in this process hands the file over without sleeping.
    # PostgreSQL needs no such lock.
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
        prepared = self.model.prepare(modality, payload)
        fut = self.batcher.submit(modality, prepared, labels=labels,
                                  top_k=int(params.get("top_k", 5)), deadline=deadline)
        # Bounded, so a wedged device cannot hold a task thread (and its message)
        # forever: the job fails and the message is acknowledged.
        return fut.result(timeout=max(60.0, self.settings.visibility_timeout / 2))


def _log_metrics(batcher: DynamicBatcher, every: float) -> None:
    while True:
        time.sleep(every)
        log.info("batching %s", json.dumps(batcher.metrics.summary()))


_HOST: ModelHost | None = None


def init_host(settings: Settings, device: str | None = None) -> ModelHost:
    global _HOST
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    model = MultimodalModel.load(device=device or settings.device, settings=settings)
    engine = make_engine(settings.db_url)
    cfg = BatcherConfig.for_device(model.device, max_batch_tokens=settings.max_batch_tokens,
                                   max_batch_size=settings.max_batch_size,
                                   max_wait_ms=settings.max_wait_ms)
    batcher = DynamicBatcher(model, cfg)
    if settings.metrics_log_every_s > 0:
        threading.Thread(target=_log_metrics, args=(batcher, settings.metrics_log_every_s),
                         daemon=True, name="mmq-metrics-log").start()
    log.info("batching: %s", cfg)
    lock = threading.Lock() if engine.dialect.name == "sqlite" else None
    _HOST = ModelHost(settings, model, session_factory(engine), batcher, lock)
    return _HOST


def host() -> ModelHost:
    if _HOST is None:
        raise RuntimeError("the model host is not initialised; start workers with "
                           "`mmq worker <modality>`")
    return _HOST
