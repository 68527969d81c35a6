"""Worker leases (one row per worker process, renewed by its heartbeat) and the
running jobs whose worker no longer holds one (the sweep requeues them)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from core.jobs import JobStatus
from core.store.db import _insert_for
from core.store.tables import (
    Job,
    WorkerLease,
    db_now,
)


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


def forget_dead_leases(*, session: Session, older_than: timedelta) -> int:
    res = session.execute(delete(WorkerLease).where(
        WorkerLease.heartbeat_at < db_now(-older_than.total_seconds())))
    return res.rowcount


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


def _same(col, value):
    return col.is_(None) if value is None else col == value
