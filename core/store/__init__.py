"""The results store: jobs, their payloads and their predictions, in SQL.

SQLAlchemy 2.x on SQLite (embedded default, WAL mode) or PostgreSQL. The job row
is the source of truth for a job's state. Payload bytes are stored here, content
addressed in ``blobs`` (the claim check: only job ids travel through Redis).
Predictions are upserted by job id, so a job delivered twice has one prediction.
Store functions take keyword-only arguments and a session; callers own commits.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import case, delete, func, select, tuple_, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from core.jobs import JobResult, JobStatus
from core.store.tables import (  # noqa: F401  (the store's public names, in one place)
    ACTIVE,
    BASE_VERSION,
    Base,
    Blob,
    IdempotencyKey,
    Job,
    ModelVersion,
    Prediction,
    VersionStatus,
    WorkerLease,
    db_now,
    make_engine,
    session_factory,
    utcnow,
)


def unreachable(e: BaseException) -> bool:
    """The database went away (refused, cut, timed out, locked), as opposed to a bad
    statement or bad data, which would fail the same way again: worth a retry, and
    an HTTP 503 rather than a 500."""
    if isinstance(e, OperationalError | InterfaceError):
        return True
    return isinstance(e, DBAPIError) and bool(e.connection_invalidated)


# -- jobs -----------------------------------------------------------------------------

def put_blob(*, session: Session, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    if session.get(Blob, digest) is None:
        session.add(Blob(sha256=digest, data=data, size=len(data)))
        session.flush()
    return digest


def get_blob(*, session: Session, sha256: str) -> bytes:
    blob = session.get(Blob, sha256)
    if blob is None:
        raise KeyError(f"payload {sha256} is missing from the store")
    return blob.data


def db_time(*, session: Session) -> datetime:
    """The database server's clock now (timezone-aware): one round trip, for a caller
    that stamps many rows or asks "how long ago" (see ``db_now``)."""
    return _aware(session.scalar(select(db_now())))


def create_job(*, session: Session, modality: str, task: str, params: dict | None = None,
               text: str | None = None, payload: bytes | None = None,
               deadline: datetime | None = None, timeout_s: float | None = None,
               job_id: str | None = None, owner: str | None = None,
               model_version: str | None = None, now: datetime | None = None) -> Job:
    """A queued job. ``model_version`` is the version the caller named (checked by the
    producer); None = whichever is promoted when a worker starts it. ``timeout_s`` sets
    the deadline from the database's clock (it wins over ``deadline``, an instant the
    caller chose); ``now`` is ``db_time`` read once for a batch of jobs."""
    now = now or db_time(session=session)
    if timeout_s is not None:
        deadline = now + timedelta(seconds=timeout_s)
    sha = put_blob(session=session, data=payload) if payload is not None else None
    job = Job(id=job_id or str(uuid.uuid4()), modality=modality, task=task, params=params or {},
              status=JobStatus.QUEUED.value, text=text, payload_sha256=sha, deadline=deadline,
              attempts=0, created_at=now, owner=owner, model_version=model_version)
    session.add(job)
    return job


def get_job(*, session: Session, job_id: str, owner: str | None = None) -> Job | None:
    """The job; with ``owner``, only if that key id made it (None: anyone's)."""
    job = session.get(Job, job_id)
    if job is None or (owner is not None and job.owner != owner):
        return None
    return job


def get_prediction(*, session: Session, job_id: str) -> Prediction | None:
    return session.get(Prediction, job_id)


def mark_sent(*, session: Session, job_ids: list[str]) -> None:
    session.execute(update(Job).where(Job.id.in_(job_ids)).values(sent_at=db_now()))


# Settings.lease_s's default; workers pass their own to the starts.
DEFAULT_LEASE = timedelta(seconds=20)


def _startable(worker: str, lease: timedelta):
    """A job this worker may start: ``queued``, or ``running`` under this same worker
    (its task retrying) or under a worker whose lease is dead (a redelivery after that
    worker died). Not one running under another live worker: a late start there (a
    host whose link came back after the sweep had handed its jobs on, a message
    redelivered by kombu's visibility timeout while its job still runs) would take
    the job from the attempt that holds it, and that attempt's result would be late."""
    alive = select(WorkerLease.worker).where(
        WorkerLease.heartbeat_at >= db_now(-lease.total_seconds()))
    running = _JOBS.c.status == JobStatus.RUNNING.value
    return ((_JOBS.c.status == JobStatus.QUEUED.value)
            | (running & (_JOBS.c.worker.is_(None) | (_JOBS.c.worker == worker)
                          | _JOBS.c.worker.not_in(alive))))


def start_job(*, session: Session, job_id: str, worker: str,
              lease: timedelta = DEFAULT_LEASE) -> Job | None:
    """queued (or running, see ``_startable``) -> running, atomically; None if the job
    must not run (it is terminal: done, failed or cancelled; or another live worker
    holds it). One statement (UPDATE ... RETURNING). The job's new ``attempts`` is
    this start's fencing token (see ``finish_jobs``)."""
    return session.scalars(
        update(Job).where(Job.id == job_id, _startable(worker, lease))
        .values(status=JobStatus.RUNNING.value, attempts=Job.attempts + 1,
                started_at=db_now(), worker=worker, model_version=_resolved_version())
        .returning(Job), execution_options={"synchronize_session": False}).one_or_none()


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


def start_jobs(*, session: Session, job_ids: list[str], worker: str,
               lease: timedelta = DEFAULT_LEASE) -> dict:
    """``start_job`` for many jobs in one statement -> the started ones by id, as rows
    of RUN_COLUMNS (attribute access like a Job)."""
    rows = session.execute(
        update(_JOBS).where(_JOBS.c.id.in_(job_ids), _startable(worker, lease))
        .values(status=JobStatus.RUNNING.value, attempts=_JOBS.c.attempts + 1,
                started_at=db_now(), worker=worker, model_version=_resolved_version())
        .returning(*RUN_COLUMNS)).all()
    return {r.id: r for r in rows}


def _prediction_values(job_id: str, model_version: str, r: JobResult) -> dict:
    emb = None if r.embedding is None else np.asarray(r.embedding, "<f4")
    return {
        "job_id": job_id, "model_version": model_version,
        "labels": None if r.labels is None else [list(x) for x in r.labels],
        "tokens": r.tokens, "truncated": r.truncated, "text": r.text,
        "embedding": None if emb is None else emb.tobytes(),
        "dim": None if emb is None else int(emb.shape[-1]),
    }


def _holds(fences: dict[str, int]):
    """The fence: the job is ``running`` under exactly that start (its attempt number).
    Only the attempt that holds a job may record its outcome: an earlier attempt that
    outlived its lease (stalled, cut off, its job handed to another worker, or the
    job cancelled meanwhile) finds no row to change, so ``cancelled`` and ``failed``
    never turn into ``succeeded`` and a stale failure never overwrites a result."""
    return (tuple_(_JOBS.c.id, _JOBS.c.attempts).in_(list(fences.items()))
            & (_JOBS.c.status == JobStatus.RUNNING.value))


def finish_jobs(*, session: Session, model_version: str, results: dict[str, JobResult],
                attempts: dict[str, int]) -> set[str]:
    """Mark the jobs ``succeeded`` and upsert their predictions, fenced: only jobs still
    running under the attempt in ``attempts`` (job id -> the token its start returned).
    One UPDATE ... RETURNING (it takes the rows' locks first, so a concurrent cancel
    either precedes it and wins, or waits and finds the job finished), then one upsert
    for the jobs it changed. -> the ids recorded; the rest were late and are dropped."""
    if not results:
        return set()
    done = set(session.scalars(
        update(_JOBS).where(_holds({j: attempts[j] for j in results}))
        .values(status=JobStatus.SUCCEEDED.value, finished_at=db_now(), error=None,
                model_version=model_version).returning(_JOBS.c.id)))
    rows = [_prediction_values(j, model_version, r) for j, r in results.items() if j in done]
    if rows:
        session.execute(_upsert_many(session, Prediction.__table__, rows[0], key="job_id",
                                     fixed={"created_at": db_now()}), rows)
    return done


def finish_job(*, session: Session, job_id: str, attempt: int, model_version: str,
               result: JobResult) -> bool:
    """``finish_jobs`` for one job; False if the attempt no longer holds it."""
    return bool(finish_jobs(session=session, model_version=model_version,
                            results={job_id: result}, attempts={job_id: attempt}))


def fail_job(*, session: Session, job_id: str, error: str, attempt: int | None,
             status: JobStatus = JobStatus.FAILED) -> bool:
    """running -> ``status`` (failed, or cancelled past its deadline), fenced like
    ``finish_jobs`` by the attempt that holds the job. ``attempt=None``: a job that no
    attempt started (it failed before it could start) and is still ``queued``.
    -> False if the outcome was late and dropped."""
    if attempt is None:
        held = (Job.id == job_id) & (Job.status == JobStatus.QUEUED.value)
    else:
        held = _holds({job_id: attempt})
    res = session.execute(update(Job).where(held).values(
        status=status.value, error=error[:4000], finished_at=db_now()))
    return res.rowcount == 1


def cancel_job(*, session: Session, job_id: str, owner: str | None = None) -> bool:
    """queued or running -> cancelled, at once. A running attempt is not interrupted:
    its outcome finds the job no longer held and is dropped (``finish_jobs``), and its
    worker drops it from a batch that has not started. False if the job is already
    terminal (or unknown). With ``owner``, only a job that key id made."""
    q = update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE))
    if owner is not None:
        q = q.where(Job.owner == owner)
    res = session.execute(
        q.values(status=JobStatus.CANCELLED.value, finished_at=db_now(),
                 error=case((Job.status == JobStatus.RUNNING.value, "cancelled while running"),
                            else_="cancelled before it ran")))
    return res.rowcount == 1


def cancelled_among(*, session: Session, job_ids: list[str]) -> list[str]:
    """Which of these (a worker's jobs in flight) were cancelled meanwhile."""
    if not job_ids:
        return []
    return list(session.scalars(select(Job.id).where(
        Job.id.in_(job_ids), Job.status == JobStatus.CANCELLED.value)))


def list_jobs(*, session: Session, status: str | None = None, modality: str | None = None,
              since: datetime | None = None, limit: int = 100,
              before: tuple[datetime, str] | None = None,
              owner: str | None = None) -> list[Job]:
    """Newest first, keyset-paginated: ``before`` is the (created_at, id) of the last
    job of the previous page, so a page never skips or repeats a job as rows arrive.
    With ``owner``, only the jobs that key id made (None: everyone's)."""
    q = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    if owner is not None:
        q = q.where(Job.owner == owner)
    if status:
        q = q.where(Job.status == status)
    if modality:
        q = q.where(Job.modality == modality)
    if since:
        q = q.where(Job.created_at >= since)
    if before:
        at, job_id = before
        q = q.where((Job.created_at < at) | ((Job.created_at == at) & (Job.id < job_id)))
    return list(session.scalars(q))


def finished_since(*, session: Session, after: datetime, limit: int = 100_000) -> list[tuple]:
    """(modality, status, created_at, finished_at) of jobs finished after ``after``,
    oldest first: what the latency histogram has not seen yet."""
    q = (select(Job.modality, Job.status, Job.created_at, Job.finished_at)
         .where(Job.finished_at > after).order_by(Job.finished_at).limit(limit))
    return [tuple(r) for r in session.execute(q)]


def get_idempotency(*, session: Session, key: str) -> IdempotencyKey | None:
    return session.get(IdempotencyKey, key)


def stale_queued(*, session: Session, older_than: timedelta, limit: int = 10_000,
                 sent_before: datetime | None = None) -> list[Job]:
    """Queued jobs whose task was sent (or attempted) longer ago than ``older_than``:
    their message may have been lost with a broker restart. With ``sent_before``, only
    jobs whose send succeeded before that instant of the database's clock (a job whose
    send failed, or is still being tried, has no ``sent_at``)."""
    sent = func.coalesce(Job.sent_at, Job.created_at)
    q = (select(Job).where(Job.status == JobStatus.QUEUED.value,
                           sent < db_now(-older_than.total_seconds()))
         .order_by(Job.created_at).limit(limit))
    if sent_before is not None:
        q = q.where(Job.sent_at.is_not(None), Job.sent_at < sent_before)
    return list(session.scalars(q))


def renew_lease(*, session: Session, worker: str, modality: str) -> None:
    """Insert or renew this worker's lease (one row per worker process), stamped by
    the database's clock: a worker's own clock, fast or slow, cannot age it."""
    now = db_now()
    stmt = _insert_for(session)(WorkerLease).values(
        worker=worker, modality=modality, started_at=now, heartbeat_at=now)
    session.execute(stmt.on_conflict_do_update(index_elements=["worker"],
                                               set_={"heartbeat_at": now}))


def drop_lease(*, session: Session, worker: str) -> None:
    """A clean shutdown: the worker's running jobs are recoverable at once."""
    session.execute(delete(WorkerLease).where(WorkerLease.worker == worker))


def live_workers(*, session: Session, lease: timedelta,
                 modality: str | None = None) -> list[str]:
    q = select(WorkerLease.worker).where(
        WorkerLease.heartbeat_at >= db_now(-lease.total_seconds()))
    if modality is not None:
        q = q.where(WorkerLease.modality == modality)
    return list(session.scalars(q))


def orphaned_running(*, session: Session, lease: timedelta, limit: int = 10_000) -> list[Job]:
    """Running jobs whose worker holds no live lease: it died (SIGKILL, OOM, lost host)
    or shut down. Jobs started less than one lease ago are left alone, so a worker
    that has just taken a job is never mistaken for a dead one."""
    cutoff = db_now(-lease.total_seconds())
    alive = select(WorkerLease.worker).where(WorkerLease.heartbeat_at >= cutoff)
    q = (select(Job).where(Job.status == JobStatus.RUNNING.value, Job.started_at < cutoff)
         .where(Job.worker.is_(None) | Job.worker.not_in(alive))
         .order_by(Job.started_at).limit(limit))
    return list(session.scalars(q))


def requeue_orphans(*, session: Session, jobs: list[tuple[str, str | None]]) -> list[str]:
    """running -> queued for (job id, its dead worker) pairs whose task was sent again;
    a job another worker has taken meanwhile is left as it is. -> the ids moved."""
    moved = []
    for job_id, worker in jobs:
        res = session.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING.value,
                              _same(Job.worker, worker))
            .values(status=JobStatus.QUEUED.value, worker=None, sent_at=db_now()))
        if res.rowcount:
            moved.append(job_id)
    return moved


def release_jobs(*, session: Session, job_ids: list[str], worker: str) -> None:
    """running -> queued, under no worker and with no send time: the worker gives
    them up; the sweep re-sends or restores their message."""
    session.execute(
        update(Job).where(Job.id.in_(job_ids), Job.status == JobStatus.RUNNING.value,
                          Job.worker == worker)
        .values(status=JobStatus.QUEUED.value, worker=None, sent_at=None))


def forget_dead_leases(*, session: Session, older_than: timedelta) -> int:
    res = session.execute(delete(WorkerLease).where(
        WorkerLease.heartbeat_at < db_now(-older_than.total_seconds())))
    return res.rowcount


def _aware(d: datetime) -> datetime:
    return d if d.tzinfo else d.replace(tzinfo=UTC)  # SQLite returns naive UTC


def _same(col, value):
    return col.is_(None) if value is None else col == value


def count_by_status(*, session: Session) -> dict[tuple[str, str], int]:
    rows = session.execute(select(Job.modality, Job.status, func.count()).group_by(
        Job.modality, Job.status))
    return {(m, s): n for m, s, n in rows}


def _insert_for(session: Session):
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - the store supports these two
        raise RuntimeError(f"unsupported database dialect {dialect}")
    return insert


def _upsert_many(session: Session, model, example: dict, key: str, fixed: dict):
    """An upsert to execute with a list of rows shaped like ``example``; ``fixed``:
    columns set by an SQL expression, the same for every row."""
    stmt = _insert_for(session)(model).values(**fixed)
    return stmt.on_conflict_do_update(
        index_elements=[key],
        set_={k: stmt.excluded[k] for k in [*example, *fixed] if k != key})
