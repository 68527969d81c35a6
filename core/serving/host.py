"""The per-process model host: set up once before the worker consumes anything.

The threads pool runs tasks concurrently. A job goes store -> model -> store: the
group-commit writer (core/serving/writer.py) marks it running and reads its input, the
model runs it with its dynamic batcher in a spawned child process
(core/serving/modelproc.py: the forward then does not share a GIL with Celery), and
the writer stores the prediction. ``ModelHost.process`` chains the three steps
on each other's completion, so the task thread waits once per job.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from core import store
from core.config import Settings
from core.errors import InvalidInput
from core.jobs import JobStatus
from core.params import check_labels
from core.serving.batcher import BatcherConfig, DynamicBatcher
from core.serving.contracts import (
    AdapterRef,
    Cancelled,
    DeadlineExceeded,
    JobRequest,
    JobResult,
    ModelBackend,
)
from core.serving.metrics import BatchMetrics
from core.serving.writer import GroupWriter
from core.store import BASE_VERSION, make_engine, session_factory

log = logging.getLogger("mmq.worker")


class InProcessModel:
    """The model and batcher in the worker process itself (``MMQ_MODEL_PROCESS=false``):
    same interface as ``ModelProcess``; for debugging and for comparison."""

    def __init__(self, settings: Settings, device: str | None, metrics: BatchMetrics):
        import torch

        from core.model.multimodal import MultimodalModel

        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        self.model = MultimodalModel.load(device=device, settings=settings)
        self.version, self.device = self.model.version, str(self.model.device)
        self.cfg = BatcherConfig.for_device(self.model.device, settings)
        self.metrics = metrics
        from core.model.adapters import AdapterCache

        self.batcher = DynamicBatcher(self.model, self.cfg, metrics,
                                      adapters=AdapterCache(settings.adapter_cache_size))

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

    def cancel(self, job_ids: list[str]) -> None:
        self.batcher.cancel(set(job_ids))

    def close(self) -> None:
        self.batcher.stop()


class JobFuture(Future):
    """A job's outcome, as the task waits for it; ``attempt`` is the fencing token of
    this start once the store has started it (None before, or if it never started),
    so that a failure the task records is fenced like any other outcome."""

    attempt: int | None = None


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
    exporter: object | None = None  # the Prometheus sink, when the exporter runs
    lease: object | None = None  # core.serving.lease.LeaseKeeper, set by the worker
    # job id -> the attempt this process runs: what a cancel check asks the store about.
    inflight: dict[str, int] = field(default_factory=dict)
    _inflight_lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def tx(self):
        """A transaction (committed on exit), serialised per process on SQLite."""
        with self.write_lock or nullcontext(), self.sessions.begin() as s:
            yield s

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

    def _track(self, done: JobFuture, job_id: str, attempt: int) -> None:
        with self._inflight_lock:
            self.inflight[job_id] = attempt

        def untrack(_f) -> None:
            with self._inflight_lock:
                if self.inflight.get(job_id) == attempt:
                    del self.inflight[job_id]

        done.add_done_callback(untrack)

    def _late(self, job_id: str, modality: str, attempt: int, what: str) -> dict:
        """An outcome the fence refused: the attempt outlived its hold on the job."""
        log.warning("job %s: dropped the late %s of attempt %d (the job was cancelled, or "
                    "handed to another attempt, meanwhile)", job_id, what, attempt)
        self.metrics.observe_late(modality)
        return {"job": job_id, "modality": modality, "status": "dropped",
                "reason": f"late {what} of attempt {attempt}"}

    def process(self, job_id: str, worker: str) -> JobFuture:
        """Run one job: start it in the store, run the model, store the outcome.
        -> a future of the task's summary dict, resolved once the outcome is committed
        (so a late ack follows the stored prediction); store errors are raised.

        Each step is started by the previous one's completion (in the writer's or the
        model receiver's thread), not by the task thread: that thread then wakes once
        per job instead of three times. Each wake-up is a few context switches and GIL
        hand-offs, a tenth of the worker's CPU per job at load (bench/e2e.py)."""
        done = JobFuture()

        def started(value) -> None:
            job, payload, version = value
            if job is None:  # cancelled, already done, or unknown (no row): nothing to run
                done.set_result({"job": job_id, "status": payload})
                return
            attempt = done.attempt = job.attempts  # the fencing token of this start
            self._track(done, job_id, attempt)
            if job.model_version != BASE_VERSION and version is None:
                self._fail(done, job_id, attempt, job.modality, f"model version "
                           f"{job.model_version!r} no longer exists (removed after the job "
                           "was submitted)", JobStatus.FAILED)
                return
            adapter = None if version is None else AdapterRef(
                version.name, version.modality,
                str(Path(self.settings.adapters_path) / version.adapter_file), version.sha256)
            deadline = None
            if job.deadline:
                # The database's clock on both sides (the deadline was set from it at
                # submit, ``now`` read by the start): this worker's wall clock never
                # decides. The rest is a duration on this host's monotonic clock.
                left = (_aware(job.deadline) - _aware(job.now)).total_seconds()
                if left <= 0:
                    self._fail(done, job_id, attempt, job.modality,
                               "deadline passed before it ran", JobStatus.CANCELLED)
                    return
                deadline = time.monotonic() + left
            params = dict(job.params or {})
            try:
                labels = (check_labels(params.get("labels") or []) if job.task == "classify"
                          else None)
            except InvalidInput as e:  # a row written before today's rules
                ran_badly(job.modality, attempt, e)
                return
            fut = self.model.submit(JobRequest(job_id, job.modality, payload, labels,
                                               int(params.get("top_k", 5)), deadline, adapter))
            # The exact version the prediction came from: the adapter's name and weights,
            # or the pretrained towers' own version string.
            exact = self.model.version if adapter is None else adapter.exact
            _then(fut, done, lambda result: ran(job.modality, attempt, result, exact),
                  on_error=lambda e: ran_badly(job.modality, attempt, e))

        def ran(modality: str, attempt: int, result: JobResult, exact: str) -> None:
            def recorded(ok: bool) -> None:
                done.set_result(_summary(job_id, modality, result, exact) if ok else
                                self._late(job_id, modality, attempt, "result"))

            _then(self.writer.finish(job_id, attempt, exact, result), done, recorded)

        def ran_badly(modality: str, attempt: int, e: BaseException) -> None:
            if isinstance(e, Cancelled):  # the row says so already: nothing to write
                done.set_result({"job": job_id, "modality": modality, "status": "cancelled"})
            elif isinstance(e, DeadlineExceeded):
                self._fail(done, job_id, attempt, modality, str(e), JobStatus.CANCELLED)
            elif isinstance(e, InvalidInput):
                self._fail(done, job_id, attempt, modality, str(e.reason), JobStatus.FAILED)
            else:
                done.set_exception(e)

        _then(self.writer.start(job_id, worker), done, started)
        return done

    def _fail(self, done: Future, job_id: str, attempt: int, modality: str, error: str,
              status: JobStatus) -> None:
        summary = {"job": job_id, "modality": modality, "status": status.value, "error": error}

        def recorded(ok: bool) -> None:
            done.set_result(summary if ok else self._late(job_id, modality, attempt, status.value))

        _then(self.writer.call(lambda s: store.fail_job(session=s, job_id=job_id, error=error,
                                                        attempt=attempt, status=status)),
              done, recorded)

    def close(self) -> None:
        self.model.close()


def _then(fut: Future, done: Future, fn: Callable[[object], None],
          on_error: Callable[[BaseException], None] | None = None) -> None:
    """When ``fut`` completes: ``fn(result)``, or ``on_error(exc)`` (default: fail
    ``done``). Whatever ``fn`` raises fails ``done``: no job is left waiting."""
    def step(f: Future) -> None:
        try:
            e = f.exception()
            if e is None:
                fn(f.result())
            elif on_error is not None:
                on_error(e)
            else:
                done.set_exception(e)
        except BaseException as e:  # noqa: BLE001  (handed to the waiting task)
            if not done.done():
                done.set_exception(e)

    fut.add_done_callback(step)


def _aware(d: datetime) -> datetime:
    return d if d.tzinfo else d.replace(tzinfo=UTC)  # SQLite returns naive datetimes


def _summary(job_id: str, modality: str, result: JobResult, version: str) -> dict:
    """What Flower shows as the task's result: enough to find the job in the store."""
    out = {"job": job_id, "modality": modality, "status": "succeeded",
           "model_version": version}
    if result.labels:
        out["top"] = list(result.labels[0])
    if result.text is not None:  # audio: the start of the transcript, for the task list
        out["text"] = result.text if len(result.text) <= 80 else result.text[:77] + "..."
    if not result.labels and result.text is None:
        out["embedding_dim"] = len(result.embedding)
    return out


def _log_metrics(metrics: BatchMetrics, every: float) -> None:
    while True:
        time.sleep(every)
        log.info("batching %s", json.dumps(metrics.summary()))


_HOST: ModelHost | None = None


def init_host(settings: Settings, device: str | None = None, *, modality: str = "text",
              worker: str = "worker") -> ModelHost:
    global _HOST
    metrics = BatchMetrics()
    from core.serving.exporter import start_exporter

    exporter = start_exporter(settings.worker_metrics_port, worker, modality, metrics,
                              host=settings.worker_metrics_host)
    if settings.model_process:
        from core.serving.modelproc import ModelProcess

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
    writer = GroupWriter(sessions, lock, lease=timedelta(seconds=settings.lease_s))
    _HOST = ModelHost(settings, model, metrics, sessions, writer, lock,
                      exporter)
    return _HOST


def host() -> ModelHost:
    if _HOST is None:
        raise RuntimeError("the model host is not initialised; start workers with "
                           "`mmq worker <modality>`")
    return _HOST
