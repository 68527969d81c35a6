"""The one task: run a job by id. Thin: the host starts it in the store, runs the
model and stores the outcome (core/serving/host.py); the task waits, retries through
outages, and summarises. The host and the lease are the worker's runtime, held by
the Celery app (workers/app.py).

Retries happen inside the task, not through Celery's ``self.retry``: a retry
there publishes a new message, which fails while the broker is down, and the
message is acknowledged once retries run out, recorded or not. Here the task
thread backs off and tries again (settings: task_max_retries,
retry_backoff_max_s), keeping its message unacknowledged the whole time. An
outcome is always recorded before the message is acknowledged: if even the
failure cannot be written, the message is rejected back onto the queue.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from celery.exceptions import Reject
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core import store
from core.config import Settings
from core.errors import brief_error, brief_traceback
from core.jobs import RUN_JOB_TASK, RUN_JOBS_TASK
from core.serving.host import JobFuture
from workers import poison
from workers.app import app

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """What a task raises once its job's failure is recorded: that failure's text (the
    error's class and, for a database error, the driver's first line), with no chain.
    Not the error itself: Celery logs a task's error with its traceback and sends both
    in the task-failed event that Flower shows, and a database error's message carries
    its statement and parameters (a prediction, a transcript: a user's data). Declared
    in the tasks' ``throws``, so Celery logs it without a traceback; ``_run`` has
    logged where it happened."""


def transient(e: BaseException) -> bool:
    """Worth a retry: the database or the broker went away for a moment. Other
    database errors (a constraint, bad data) would fail the same way again."""
    return store.unreachable(e) or isinstance(
        e, ConnectionError | TimeoutError | RedisConnectionError | RedisTimeoutError)


@app.task(name=RUN_JOB_TASK, bind=True, max_retries=None, throws=(JobFailed,))
def run_job(self, job_id: str, modality: str | None = None) -> dict:
    return _run(job_id, self.request.hostname or "worker", None)


@app.task(name=RUN_JOBS_TASK, bind=True, max_retries=None, throws=(JobFailed,))
def run_jobs(self, job_ids: list[str], modality: str | None = None) -> dict:
    """Several jobs in one message (core/broker/sender.py): the host runs them together
    (one start, one hand-over to the model, one record: they batch together), and the
    message is acknowledged once every outcome is recorded. The jobs whose try failed
    for a passing reason (the store or the broker away) are tried again together, after
    one backoff per round: job by job, each after a backoff of its own and in a forward
    of its own, a 16-job message took 16 s to recover from a database outage (about 1
    job/s; tests/e2e/test_recovery.py). An internal error fails only its job; one whose
    outcome cannot be recorded rejects the whole message back onto the queue, and its
    redelivery finds the others finished."""
    worker = self.request.hostname or "worker"
    settings = app.runtime.host.settings
    left = list(dict.fromkeys(job_ids))
    n = len(left)
    statuses: Counter = Counter()
    # Each job's latest start (fencing token), kept across rounds, as ``_run`` keeps it.
    tokens: dict[str, int] = {}
    for attempt in range(settings.task_max_retries + 1):
        futs, handover = _try_start_many(left, worker)
        again: list[str] = []
        for job_id in left:
            fut = futs.get(job_id)
            if fut is None and handover is not None and not transient(handover):
                # The batch path itself failed: this job alone, as ``run_job`` runs it.
                statuses[_run_counted(job_id, worker)] += 1
                continue
            try:
                if fut is None:
                    raise handover or RuntimeError("the host returned no future")
                statuses[_summarise(job_id, fut).get("status", "?")] += 1
            except Exception as e:  # noqa: BLE001  (retried, or recorded as the failure)
                if fut is not None and fut.attempt is not None:
                    tokens[job_id] = fut.attempt
                if transient(e) and attempt < settings.task_max_retries:
                    again.append(job_id)
                    error = e
                    continue
                _record_failure(job_id, _log_failure(job_id, e, attempt), tokens.get(job_id))
                statuses["failed"] += 1
        if not again:
            break
        delay = _backoff(settings, attempt)
        log.warning("%d of a message's %d jobs: %s (%s); retry %d of %d in %g s, together",
                    len(again), n, type(error).__name__, str(error).splitlines()[0][:200],
                    attempt + 1, settings.task_max_retries, delay)
        time.sleep(delay)
        left = again
    return {"jobs": n, **statuses}


def _try_start_many(job_ids: list[str], worker: str,
                    ) -> tuple[dict[str, JobFuture], Exception | None]:
    """The jobs' try handed to the host together -> their futures, or ({}, the error)
    if the hand-over itself raised."""
    try:
        return app.runtime.host.process_many(job_ids, worker), None
    except Exception as e:  # noqa: BLE001  (the caller retries or runs each alone)
        return {}, e


def _run_counted(job_id: str, worker: str) -> str:
    """``_run`` from scratch -> the job's status ("failed" once its failure is recorded)."""
    try:
        return _run(job_id, worker, None).get("status", "?")
    except Reject:
        raise
    except Exception:  # noqa: BLE001  (recorded as the job's failure by _run)
        return "failed"


def _run(job_id: str, worker: str, fut: JobFuture | None) -> dict:
    """Wait for the job's outcome (``fut``: its first try, already handed to the host),
    retrying transient errors with backoff; a failure is recorded before it is raised."""
    host = app.runtime.host
    settings = host.settings
    # The latest start's fencing token, kept across tries: a try that fails before its
    # start (the store still down) leaves the job running under an earlier try's start,
    # and a failure fenced by no token (``queued`` only) would leave it running for good.
    token = None
    for attempt in range(settings.task_max_retries + 1):
        try:
            if fut is None:
                fut = host.process(job_id, worker)
            return _summarise(job_id, fut)
        except Exception as e:
            # The start that holds the job, if it started: the failure is fenced by it.
            if fut is not None and fut.attempt is not None:
                token = fut.attempt
            fut = None
            if not transient(e) or attempt == settings.task_max_retries:
                error = _log_failure(job_id, e, attempt)
                _record_failure(job_id, error, token)
                # Recorded: Celery marks the task failed and acknowledges it.
                raise JobFailed(error) from None
            delay = _backoff(settings, attempt)
            log.warning("job %s: %s (%s); retry %d of %d in %g s", job_id, type(e).__name__,
                        str(e).splitlines()[0][:200], attempt + 1, settings.task_max_retries,
                        delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _backoff(settings: Settings, attempt: int) -> float:
    """Seconds before retry ``attempt + 1``: doubling from 1 s, capped."""
    return min(settings.retry_backoff_max_s, 2.0 ** attempt)


def _failure(e: Exception, attempt: int) -> str:
    """The recorded error of a job that will not be tried again: one line, and for a
    database error the driver's message without its statement (a prediction PostgreSQL
    refused was recorded as 1,649 characters of SQL and parameters)."""
    why = f"gave up after {attempt} retries" if transient(e) else "internal error"
    return f"{why}: {brief_error(e, 1000)}"


def _log_failure(job_id: str, e: Exception, attempt: int) -> str:
    """Log a job's final failure -> the error to record. Both tasks log it, so that a
    job of a batch message that failed is in the worker's log as one run alone is."""
    error = _failure(e, attempt)
    # Where it happened, without SQL; an outage's traceback is no news.
    log.error("job %s: %s%s", job_id, error,
              "" if transient(e) else "\n" + brief_traceback(e))
    return error


def _summarise(job_id: str, fut: JobFuture) -> dict:
    # Bounded, so that a hung store or a wedged device cannot hold a task thread (and
    # its message) forever: the task retries, then fails.
    store_wait = max(60.0, app.runtime.host.settings.visibility_timeout / 2)
    summary = fut.result(timeout=3 * store_wait)
    if summary.get("status") == "unknown":  # no row: a poison message, not a job
        poison.dead_letter_unknown_job(job_id)
    return summary


def _record_failure(job_id: str, error: str, attempt: int | None) -> None:
    """Write the failure, or refuse to acknowledge: a job whose outcome cannot be
    recorded goes back onto the queue. With the broker down too, the reject fails
    and the message stays unacknowledged: the worker then hands the job back to
    ``queued`` once the store answers (core/serving/lease.py), and the sweep puts its
    message back. Fenced by ``attempt`` (None: the job never started here): a failure
    of an attempt that no longer holds the job is dropped."""
    try:
        app.runtime.host.record_failure(job_id, error, attempt)
    except Exception as e:
        log.error("job %s: could not record its failure (%s); leaving its message "
                  "unacknowledged", job_id, brief_error(e))
        app.runtime.lease.abandon(job_id)  # handed back once the store answers again
        # Not ``from e``: Celery logs a rejection with its traceback, chain and all, and
        # the chain's database errors would print their statements and parameters.
        raise Reject(f"outcome not recorded: {type(e).__name__}", requeue=True) from None
