"""The one task: run a job by id. Thin: load, hand to the batcher, store, summarise."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from sqlalchemy.exc import DBAPIError, OperationalError

from core import store
from core.batcher import DeadlineExceeded
from core.errors import InvalidInput
from core.jobs import RUN_JOB_TASK, JobStatus
from workers.app import app
from workers.host import host

log = logging.getLogger(__name__)

# Worth a retry: the database or the broker went away for a moment.
TRANSIENT = (OperationalError, DBAPIError, ConnectionError, TimeoutError)


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str, modality: str | None = None) -> dict:
    try:
        return _run(job_id, self.request.hostname or "worker")
    except TRANSIENT as e:
        n = self.request.retries
        if n >= host().settings.task_max_retries:
            raise
        log.warning("job %s: transient %s, retry %d", job_id, type(e).__name__, n + 1)
        raise self.retry(exc=e, countdown=min(60, 2 ** n)) from e


def _run(job_id: str, worker: str) -> dict:
    h = host()
    wait = max(60.0, h.settings.visibility_timeout / 2)  # a hung store: retry, not hang
    job, payload = h.writer.start(job_id, worker).result(timeout=wait)
    if job is None:  # cancelled, already done, or unknown: nothing to run
        return {"job": job_id, "status": payload}
    deadline = None
    if job.deadline:
        left = (_aware(job.deadline) - datetime.now(UTC)).total_seconds()
        if left <= 0:
            _fail(job_id, "deadline passed before it ran", JobStatus.CANCELLED, wait)
            return {"job": job_id, "status": JobStatus.CANCELLED.value}
        deadline = time.monotonic() + left
    modality = job.modality
    try:
        result = h.run(modality, job.task, payload, dict(job.params or {}), deadline)
    except DeadlineExceeded as e:
        _fail(job_id, str(e), JobStatus.CANCELLED, wait)
        return {"job": job_id, "modality": modality, "status": "cancelled", "error": str(e)}
    except InvalidInput as e:
        _fail(job_id, str(e.reason), JobStatus.FAILED, wait)
        return {"job": job_id, "modality": modality, "status": "failed", "error": e.reason}
    # Committed before this returns, so the late ack follows the stored prediction.
    h.writer.finish(job_id, h.model.version, result).result(timeout=wait)
    return _summary(job_id, modality, result)


def _fail(job_id: str, error: str, status: JobStatus, wait: float) -> None:
    host().writer.call(lambda s: store.fail_job(session=s, job_id=job_id, error=error,
                                                status=status)).result(timeout=wait)


def _aware(d: datetime) -> datetime:
    return d if d.tzinfo else d.replace(tzinfo=UTC)  # SQLite returns naive datetimes


def _summary(job_id: str, modality: str, result: dict) -> dict:
    """What Flower shows as the task's result: enough to find the job in the store."""
    out = {"job": job_id, "modality": modality, "status": "succeeded"}
    if result.get("labels"):
        out["top"] = result["labels"][0]
    elif result.get("embedding") is not None:
        out["embedding_dim"] = len(result["embedding"])
    return out
