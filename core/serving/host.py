"""The per-process model host: set up once before the worker consumes anything.

The threads pool runs tasks concurrently. The host takes each job through its stages
(start, prepare, forward, record: core/serving/stages.py), a message's jobs together;
it holds what the stages share: the model backend, the group-commit writer, the jobs in
flight (what a cancel check asks the store about), and the prepare stage's rules.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from core import store
from core.config import Settings
from core.errors import InvalidInput
from core.jobs import JobStatus
from core.params import check_labels
from core.serving.contracts import AdapterRef, BatcherConfig, JobRequest, ModelBackend
from core.serving.metrics import BatchMetrics
from core.serving.stages import BatchRun, JobFuture, JobRun, Refused
from core.serving.writer import GroupWriter, Started
from core.store import BASE_VERSION, make_engine, session_factory

if TYPE_CHECKING:
    from core.serving.exporter import PrometheusSink

log = logging.getLogger("mmq.worker")


class InProcessModel:
    """The model and batcher in the worker process itself (``MMQ_MODEL_PROCESS=false``):
    same interface as ``ModelProcess``; for debugging and for comparison."""

    def __init__(self, settings: Settings, device: str | None, metrics: BatchMetrics,
                 modality: str = "text"):
        import torch

        from core.model.multimodal import MultimodalModel
        from core.serving.batcher import DynamicBatcher
        from core.serving.procs import keep_freed_memory

        keep_freed_memory()  # as the model process does
        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        self.model = MultimodalModel.load(device=device, settings=settings)
        self.model.load_tower(modality)  # the worker's own, before it says it is ready
        self.version, self.device = self.model.version, str(self.model.device)
        self.cfg = BatcherConfig.for_device(self.model.device, settings, modality)
        self.metrics = metrics
        from core.model.adapters import AdapterCache

        self.batcher = DynamicBatcher(self.model, self.cfg, metrics,
                                      adapters=AdapterCache(settings.adapter_cache_size))

    def wait_ready(self) -> None:
        """Loaded in the constructor, in this process."""

    def submit(self, request: JobRequest) -> Future:
        try:
            prepared = self.model.prepare(request.modality, request.payload)
        except InvalidInput as e:  # the same path as a child process's refusal
            fut: Future = Future()
            fut.set_exception(e)
            return fut
        return self.batcher.submit(request.modality, prepared, labels=request.labels,
                                   top_k=request.top_k, deadline=request.deadline,
                                   adapter=request.adapter, key=request.job_id)

    def submit_many(self, requests: list[JobRequest]) -> list[Future]:
        return [self.submit(r) for r in requests]

    def cancel(self, job_ids: list[str]) -> None:
        self.batcher.cancel(set(job_ids))

    def close(self) -> None:
        self.batcher.stop()


@dataclass
class ModelHost:
    settings: Settings
    model: ModelBackend  # ModelProcess or InProcessModel
    metrics: BatchMetrics
    sessions: sessionmaker[Session]
    writer: GroupWriter
    # SQLite takes one writer at a time; writers in this process queue on this lock
    # rather than in SQLite's busy handler (sleeps of up to 100 ms). None on PostgreSQL.
    write_lock: threading.Lock | None = None
    exporter: PrometheusSink | None = None  # when the exporter runs
    # job id -> the attempt this process runs: what a cancel check asks the store about.
    inflight: dict[str, int] = field(default_factory=dict)
    _inflight_lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """A transaction (committed on exit), serialised per process on SQLite."""
        with self.write_lock or nullcontext(), self.sessions.begin() as s:
            yield s

    def process(self, job_id: str, worker: str) -> JobFuture:
        """Run one job: start it in the store, run the model, store the outcome.
        -> a future of the task's summary dict, resolved once the outcome is committed
        (so a late ack follows the stored prediction); store errors are raised."""
        return JobRun(self, job_id, worker).start()

    def process_many(self, job_ids: list[str], worker: str) -> dict[str, JobFuture]:
        """Run a message's jobs together (one start, one hand-over to the model, one
        record: ``BatchRun``) -> each job's future, as ``process`` gives (duplicates
        run once)."""
        return BatchRun(self, job_ids, worker).start()

    def record_failure(self, job_id: str, error: str, attempt: int | None) -> bool:
        """The task's own failure (an internal error, or retries spent), written at once
        rather than through the writer, fenced by ``attempt`` (None: the job never
        started). -> False if the outcome was late and dropped."""
        with self.tx() as s:
            return store.fail_job(session=s, job_id=job_id, error=error, attempt=attempt)

    def check_cancelled(self) -> list[str]:
        """Ask the store which of the jobs in flight here were cancelled (a user's DELETE
        of a running job) and drop them from batches that have not started. Called at
        each lease renewal: one indexed query, whatever the load. -> the ids."""
        with self._inflight_lock:
            ids = list(self.inflight)
        if not ids:
            return []
        with self.sessions() as s:
            cancelled = store.cancelled_among(session=s, job_ids=ids)
        if cancelled:
            self.model.cancel(cancelled)
        return cancelled

    def track(self, done: JobFuture, job_id: str, attempt: int) -> None:
        """In flight here until ``done`` resolves (what ``check_cancelled`` asks about)."""
        with self._inflight_lock:
            self.inflight[job_id] = attempt

        def untrack(_f) -> None:
            with self._inflight_lock:
                if self.inflight.get(job_id) == attempt:
                    del self.inflight[job_id]

        done.add_done_callback(untrack)

    def request(self, started: Started) -> JobRequest:
        """The prepare stage: a started row -> the model's request. Raises ``Refused``
        for a job that must not run (its version removed, its deadline passed, its
        labels no longer valid)."""
        job = started.job
        if job.model_version != BASE_VERSION and started.version is None:
            raise Refused(f"model version {job.model_version!r} no longer exists (removed "
                           "after the job was submitted)", JobStatus.FAILED)
        v = started.version
        adapter = None if v is None else AdapterRef(
            v.name, v.modality, str(Path(self.settings.adapters_path) / v.adapter_file),
            v.sha256)
        deadline = None
        if job.deadline:
            # The database's clock on both sides (the deadline was set from it at
            # submit, ``now`` read by the start): this worker's wall clock never
            # decides. The rest is a duration on this host's monotonic clock.
            left = (_aware(job.deadline) - _aware(job.now)).total_seconds()
            if left <= 0:
                raise Refused("deadline passed before it ran", JobStatus.CANCELLED)
            deadline = time.monotonic() + left
        params = dict(job.params or {})
        try:
            labels = (check_labels(params.get("labels") or []) if job.task == "classify"
                      else None)
        except InvalidInput as e:  # a row written before today's rules
            raise Refused(str(e.reason), JobStatus.FAILED) from e
        return JobRequest(job.id, started.attempt, job.modality, started.payload, labels,
                          int(params.get("top_k", 5)), deadline, adapter)

    def late(self, job_id: str, modality: str, attempt: int, what: str) -> dict:
        """An outcome the fence refused: the attempt outlived its hold on the job."""
        log.warning("job %s: dropped the late %s of attempt %d (the job was cancelled, or "
                    "handed to another attempt, meanwhile)", job_id, what, attempt)
        self.metrics.observe_late(modality)
        return {"job": job_id, "modality": modality, "status": "dropped",
                "reason": f"late {what} of attempt {attempt}"}

    def close(self) -> None:
        self.model.close()


def _aware(d: datetime) -> datetime:
    return d if d.tzinfo else d.replace(tzinfo=UTC)  # SQLite returns naive datetimes


def _log_metrics(metrics: BatchMetrics, every: float) -> None:
    while True:
        time.sleep(every)
        log.info("batching %s", json.dumps(metrics.summary()))


def start_host(settings: Settings, device: str | None = None, *, modality: str = "text",
               worker: str = "worker") -> ModelHost:
    """Build a worker process's host: the metrics (and their exporter), the model
    backend, the store (migrated) and its group-commit writer. A model process is
    spawned first and loads while this process migrates the store and connects: the
    two together were most of a worker's start (bench/boot.py)."""
    from core.store.migrations import upgrade

    metrics = BatchMetrics()
    model: ModelBackend | None = None
    if settings.model_process:
        from core.serving.modelproc import ModelProcess

        model = ModelProcess(settings, device or settings.device, metrics, wait=False,
                             modality=modality)
    try:
        from core.serving.exporter import start_exporter

        exporter = start_exporter(settings.worker_metrics_port, worker, modality, metrics,
                                  host=settings.worker_metrics_host)
        upgrade(settings.db_url)
        engine = make_engine(settings.db_url)
        if model is None:
            model = InProcessModel(settings, device or settings.device, metrics, modality)
        model.wait_ready()
    except BaseException:
        if model is not None:
            model.close()  # no loading child left behind a worker that cannot start
        raise
    if settings.metrics_log_every_s > 0:
        threading.Thread(target=_log_metrics, args=(metrics, settings.metrics_log_every_s),
                         daemon=True, name="mmq-metrics-log").start()
    log.info("batching: %s", model.cfg)
    lock = threading.Lock() if engine.dialect.name == "sqlite" else None
    sessions = session_factory(engine)
    writer = GroupWriter(sessions, lock, lease=timedelta(seconds=settings.lease_s))
    return ModelHost(settings, model, metrics, sessions, writer, lock, exporter)
