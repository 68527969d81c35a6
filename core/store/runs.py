"""A job's run, as workers write it: start (``running`` under a worker), then
succeed or fail, fenced by the attempt that holds the job; or give it back."""

from __future__ import annotations

from datetime import timedelta
from functools import cache

import numpy as np
from sqlalchemy import bindparam, func, select, tuple_, update
from sqlalchemy.orm import Session

from core.jobs import JobResult, JobStatus
from core.store.db import insert_for
from core.store.tables import (
    BASE_VERSION,
    Job,
    Prediction,
    WorkerLease,
    db_now,
    unindexed,
)
from core.store.webhooks import enqueue_webhooks

# Settings.lease_s's default; workers pass their own to the starts.
DEFAULT_LEASE = timedelta(seconds=20)


def _startable(worker, lease_s: float):
    """A job this worker may start: ``queued``, or ``running`` under this same worker
    (its task retrying) or under a worker whose lease is dead (a redelivery after that
    worker died). Not one running under another live worker: a late start there (a
    host whose link came back after the sweep had handed its jobs on, a message
    redelivered by kombu's visibility timeout while its job still runs) would take
    the job from the attempt that holds it, and that attempt's result would be late."""
    alive = select(WorkerLease.worker).where(
        WorkerLease.heartbeat_at >= db_now(-lease_s))
    # Unindexed: the jobs are found by id (``unindexed`` says why).
    status, held_by = unindexed(_JOBS.c.status), unindexed(_JOBS.c.worker)
    running = status == JobStatus.RUNNING.value
    return ((status == JobStatus.QUEUED.value)
            | (running & (held_by.is_(None) | (held_by == worker) | held_by.not_in(alive))))


# What a worker needs to run a job. The bulk functions below use the tables, not the
# ORM classes: the ORM's bulk-statement machinery cost more than the SQL itself.
# ``attempts`` is the fencing token; ``now`` the database's clock as the job started,
# to turn its deadline into a duration on the worker's monotonic clock.
_JOBS = Job.__table__
RUN_COLUMNS = (*(_JOBS.c[n] for n in ("id", "modality", "task", "params", "deadline", "text",
                                      "payload_sha256", "model_version", "attempts")),
               db_now().label("now"))


def _resolved_version():
    """The version a starting job runs: the one it names, else the promoted one of its
    modality at this instant, else ``base``. Written by the UPDATE that starts the job,
    so the resolution and the start are one atomic step, a redelivered job keeps the
    version it was first resolved to, and a promote reaches every worker at its next
    job (core/store/versions.py)."""
    from core.store.versions import promoted_subquery

    return func.coalesce(_JOBS.c.model_version, promoted_subquery(_JOBS.c.modality),
                         BASE_VERSION)


# The statements a worker runs for every message are built once, with bound parameters,
# and reused: building one (its expressions, then SQLAlchemy's cache key of it) cost
# more CPU than SQLite's execution of it (bench/queue_profile.py: SQL a quarter of the
# worker's CPU per text job). ``ids``, ``fences``: expanding (one ``?`` per element).
@cache
def _start_statement(lease_s: float):
    worker = bindparam("worker")
    return (update(_JOBS)
            .where(_JOBS.c.id.in_(bindparam("ids", expanding=True)),
                   _startable(worker, lease_s))
            .values(status=JobStatus.RUNNING.value, attempts=_JOBS.c.attempts + 1,
                    started_at=db_now(), worker=worker, model_version=_resolved_version())
            .returning(*RUN_COLUMNS))


def start_jobs(*, session: Session, job_ids: list[str], worker: str,
               lease: timedelta = DEFAULT_LEASE) -> dict:
    """queued (or running, see ``_startable``) -> running, atomically, for many jobs in
    one statement (UPDATE ... RETURNING) -> the started ones by id, as rows of
    RUN_COLUMNS (attribute access like a Job). A job absent from the answer must not
    run (it is terminal: done, failed or cancelled; or another live worker holds it).
    Each job's new ``attempts`` is this start's fencing token (see ``finish_jobs``)."""
    rows = session.execute(_start_statement(lease.total_seconds()),
                           {"ids": list(job_ids), "worker": worker}).all()
    return {r.id: r for r in rows}


def _prediction_values(job_id: str, model_version: str, r: JobResult) -> dict:
    emb = None if r.embedding is None else np.asarray(r.embedding, "<f4")
    return {
        "job_id": job_id, "model_version": model_version,
        "labels": None if r.labels is None else [list(x) for x in r.labels],
        "tokens": r.tokens, "truncated": r.truncated, "text": r.text,
        "segments": None if r.segments is None else [
            [round(float(a), 2), round(float(b), 2), str(t)] for a, b, t in r.segments],
        "embedding": None if emb is None else emb.tobytes(),
        "dim": None if emb is None else int(emb.shape[-1]),
    }


# The fence: the job is ``running`` under exactly that start (its attempt number), for
# the bound ``ids`` and ``fences`` ((id, attempt) pairs). Only the attempt that holds a
# job may record its outcome: an earlier attempt that outlived its lease (stalled, cut
# off, its job handed to another worker, or the job cancelled meanwhile) finds no row
# to change, so ``cancelled`` and ``failed`` never turn into ``succeeded`` and a stale
# failure never overwrites a result. Found by id (the row-value IN alone names no
# index); the rest unindexed. Built once, as the start (see ``_start_statement``).
_HELD = (_JOBS.c.id.in_(bindparam("ids", expanding=True))
         & tuple_(_JOBS.c.id, unindexed(_JOBS.c.attempts)).in_(
             bindparam("fences", expanding=True))
         & (unindexed(_JOBS.c.status) == JobStatus.RUNNING.value))
# Jobs per fenced UPDATE: PostgreSQL turns a row-value IN list into nested ORs, one
# level per pair, and refused ~9,000 pairs in one statement ("stack depth limit
# exceeded"); a big group commit is split into statements of this many.
FENCE_CHUNK = 1000
_FINISH = (update(_JOBS).where(_HELD)
           .values(status=JobStatus.SUCCEEDED.value, finished_at=db_now(), error=None,
                   model_version=bindparam("version"))
           .returning(_JOBS.c.id, _JOBS.c.webhook_url))


def finish_jobs(*, session: Session, model_version: str, results: dict[str, JobResult],
                attempts: dict[str, int]) -> set[str]:
    """Mark the jobs ``succeeded`` and upsert their predictions, fenced: only jobs still
    running under the attempt in ``attempts`` (job id -> the token its start returned).
    One UPDATE ... RETURNING (it takes the rows' locks first, so a concurrent cancel
    either precedes it and wins, or waits and finds the job finished), then one upsert
    for the jobs it changed. -> the ids recorded; the rest were late and are dropped."""
    if not results:
        return set()
    ids, ended = list(results), []
    for a in range(0, len(ids), FENCE_CHUNK):
        chunk = ids[a:a + FENCE_CHUNK]
        ended += session.execute(_FINISH, {
            "ids": chunk, "fences": [(j, attempts[j]) for j in chunk],
            "version": model_version}).all()
    done = {r.id for r in ended}
    # The webhook outbox, in this same transaction: an event exactly when the job ends.
    enqueue_webhooks(session=session, ended=[(r.id, JobStatus.SUCCEEDED.value,
                                              r.webhook_url) for r in ended])
    rows = [_prediction_values(j, model_version, r) for j, r in results.items() if j in done]
    if rows:
        session.execute(_prediction_upsert(session.get_bind().dialect.name,
                                           tuple(rows[0])), rows)
    return done


def fail_job(*, session: Session, job_id: str, error: str, attempt: int | None,
             status: JobStatus = JobStatus.FAILED) -> bool:
    """running -> ``status`` (failed, or cancelled past its deadline), fenced like
    ``finish_jobs`` by the attempt that holds the job. ``attempt=None``: a job that no
    attempt started (it failed before it could start) and is still ``queued``.
    -> False if the outcome was late and dropped."""
    if attempt is None:
        held = (_JOBS.c.id == job_id) & (unindexed(_JOBS.c.status) == JobStatus.QUEUED.value)
        fence = {}
    else:
        held, fence = _HELD, {"ids": [job_id], "fences": [(job_id, attempt)]}
    row = session.execute(update(_JOBS).where(held).values(
        status=status.value, error=error[:4000], finished_at=db_now())
        .returning(_JOBS.c.id, _JOBS.c.webhook_url), fence).first()
    if row is None:
        return False
    # The webhook outbox, in this same transaction: an event exactly when the job ends.
    enqueue_webhooks(session=session, ended=[(row.id, status.value, row.webhook_url)])
    return True


def release_jobs(*, session: Session, job_ids: list[str], worker: str) -> None:
    """running -> queued, under no worker and with no send time: the worker gives
    them up; the sweep re-sends or restores their message."""
    session.execute(
        update(Job).where(Job.id.in_(job_ids),
                          unindexed(Job.status) == JobStatus.RUNNING.value,
                          unindexed(Job.worker) == worker)
        .values(status=JobStatus.QUEUED.value, worker=None, sent_at=None))


@cache
def _prediction_upsert(dialect: str, columns: tuple[str, ...]):
    """The predictions' upsert (keyed by job id) for rows of these columns, built once
    per database kind (see ``_start_statement``); ``created_at`` is the database's clock."""
    stmt = insert_for(dialect)(Prediction.__table__).values(created_at=db_now())
    return stmt.on_conflict_do_update(
        index_elements=["job_id"],
        set_={k: stmt.excluded[k] for k in [*columns, "created_at"] if k != "job_id"})
