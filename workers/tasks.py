"""The one task: run a job by id. Thin: the host starts it in the store, runs the
model and stores the outcome (workers/host.py); the task waits and summarises."""

from __future__ import annotations

import logging

from sqlalchemy.exc import DBAPIError, OperationalError

from core.jobs import RUN_JOB_TASK
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
    # Bounded, so that a hung store or a wedged device cannot hold a task thread (and
    # its message) forever: the task retries, then fails.
    store_wait = max(60.0, h.settings.visibility_timeout / 2)
    return h.process(job_id, worker).result(timeout=3 * store_wait)
