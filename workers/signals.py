"""Cross-cutting concerns as Celery signal handlers: timing and failure persistence.

A task that raises (retries exhausted, or a bug) must not leave its job in
``running``: the failure handler writes the error to the job row.
"""

from __future__ import annotations

import logging
import time

from celery import signals

from core import store

log = logging.getLogger("mmq.worker")
_started: dict[str, float] = {}


@signals.task_prerun.connect
def _prerun(task_id=None, **_kw) -> None:
    _started[task_id] = time.perf_counter()


@signals.task_postrun.connect
def _postrun(task_id=None, retval=None, state=None, **_kw) -> None:
    t0 = _started.pop(task_id, None)
    if t0 is not None and isinstance(retval, dict):
        log.debug("job %s %s in %.1f ms", retval.get("job"), retval.get("status", state),
                 1e3 * (time.perf_counter() - t0))


@signals.task_failure.connect
def _failure(task_id=None, exception=None, args=None, kwargs=None, **_kw) -> None:
    from workers.host import host

    job_id = (args or [None])[0] or (kwargs or {}).get("job_id")
    if not job_id:
        return
    try:
        with host().tx() as s:
            store.fail_job(session=s, job_id=job_id,
                           error=f"internal error: {type(exception).__name__}: {exception}")
    except Exception:  # the store itself is down: requeue/redelivery will find the job
        log.exception("job %s: could not record the failure", job_id)
