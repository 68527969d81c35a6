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
    with h.tx() as s:
        job = store.start_job(session=s, job_id=job_id, worker=worker)
        if job is None:  # cancelled, already done, or unknown: nothing to run
            current = store.get_job(session=s, job_id=job_id)
            return {"job": job_id, "status": current.status if current else "unknown"}
        deadline = None
        if job.deadline:
            left = (_aware(job.deadline) - datetime.now(UTC)).total_seconds()
            if left <= 0:
                store.fail_job(session=s, job_id=job_id, error="deadline passed before it ran",
                               status=JobStatus.CANCELLED)
                return {"job": job_id, "status": JobStatus.CANCELLED.value}
            deadline = time.monotonic() + left
        payload = job.text if job.modality == "text" else store.get_blob(
            session=s, sha256=job.payload_sha256)
        modality, task, params = job.modality, job.task, dict(job.params or {})
    try:
        result = h.run(modality, task, payload, params, deadline)
    except DeadlineExceeded as e:
        with h.tx() as s:
            store.fail_job(session=s, job_id=job_id, error=str(e), status=JobStatus.CANCELLED)
        return {"job": job_id, "modality": modality, "status": "cancelled", "error": str(e)}
    except InvalidInput as e:
        with h.tx() as s:
            store.fail_job(session=s, job_id=job_id, error=str(e.reason))
        return {"job": job_id, "modality": modality, "status": "failed", "error": e.reason}
    with h.tx() as s:
        store.finish_job(session=s, job_id=job_id, model_version=h.model.version, **result)
    return _summary(job_id, modality, result)


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
