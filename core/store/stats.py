"""Counts and histories for the metrics and dashboards."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import func, literal, select, union_all
from sqlalchemy.orm import Session

from core.jobs import JobStatus
from core.store.tables import Job, Prediction, WorkerLease, db_now


def count_by_status(*, session: Session) -> dict[tuple[str, str], int]:
    rows = session.execute(select(Job.modality, Job.status, func.count()).group_by(
        Job.modality, Job.status))
    return {(m, s): n for m, s, n in rows}


def finished_since(*, session: Session, after: datetime, limit: int = 100_000) -> list[tuple]:
    """(modality, status, created_at, finished_at) of jobs finished after ``after``,
    oldest first: what the latency histogram has not seen yet."""
    q = (select(Job.modality, Job.status, Job.created_at, Job.finished_at)
         .where(Job.finished_at > after).order_by(Job.finished_at).limit(limit))
    return [tuple(r) for r in session.execute(q)]


def succeeded_within(*, session: Session, seconds: float) -> dict[str, int]:
    """Jobs that succeeded in the last ``seconds``, by modality; the window is on the
    stamps' own clock (the database's), not the caller's."""
    since = db_now(-seconds)
    rows = session.execute(
        select(Job.modality, func.count())
        .where(Job.status == JobStatus.SUCCEEDED.value, Job.finished_at >= since)
        .group_by(Job.modality))
    return {m: n for m, n in rows}


def latest_failures(*, session: Session, limit: int) -> list[Job]:
    """The most recently failed jobs, newest first."""
    return list(session.scalars(
        select(Job).where(Job.status == JobStatus.FAILED.value)
        .order_by(Job.finished_at.desc()).limit(limit)))


def latest_transcripts(*, session: Session, limit: int) -> list[tuple]:
    """(id, finished_at, transcript) of the latest transcribed audio jobs, newest first."""
    return [tuple(r) for r in session.execute(
        select(Job.id, Job.finished_at, Prediction.text)
        .join(Prediction, Prediction.job_id == Job.id)
        .where(Job.modality == "audio", Job.status == JobStatus.SUCCEEDED.value,
               Prediction.text.is_not(None))
        .order_by(Job.finished_at.desc()).limit(limit))]


def count_by_owner(*, session: Session) -> list[tuple]:
    """(owner, status, count) for every key id and status that has jobs."""
    return [tuple(r) for r in session.execute(
        select(Job.owner, Job.status, func.count()).group_by(Job.owner, Job.status))]


# -- what the alert rules watch (producer/ops/monitoring/alerts.yml) -------------------
# One query per metric family and scrape, each served by an index at a million jobs
# (bench/metrics_scrape.py measures them).


def live_workers_by_modality(*, session: Session, lease_s: float) -> dict[str, int]:
    """Worker processes per modality whose lease the database's clock says is live."""
    rows = session.execute(
        select(WorkerLease.modality, func.count())
        .where(WorkerLease.heartbeat_at >= db_now(-lease_s))
        .group_by(WorkerLease.modality))
    return {m: n for m, n in rows}


def oldest_active(*, session: Session) -> dict[tuple[str, str], datetime]:
    """(modality, status) -> when the oldest ``queued`` job was submitted and the oldest
    ``running`` job started; ages are taken against ``db_time`` (the same clock)."""
    queued = (select(Job.modality, literal(JobStatus.QUEUED.value), func.min(Job.created_at))
              .where(Job.status == JobStatus.QUEUED.value).group_by(Job.modality))
    running = (select(Job.modality, literal(JobStatus.RUNNING.value), func.min(Job.started_at))
               .where(Job.status == JobStatus.RUNNING.value).group_by(Job.modality))
    rows = session.execute(union_all(queued, running))
    return {(m, st): _aware(at) for m, st, at in rows if at is not None}


def cancelled_while_running(*, session: Session) -> dict[str, int]:
    """Cancelled jobs that had started (their attempt's outcome will be dropped)."""
    rows = session.execute(
        select(Job.modality, func.count())
        .where(Job.status == JobStatus.CANCELLED.value, Job.started_at.is_not(None))
        .group_by(Job.modality))
    return {m: n for m, n in rows}


def _aware(d: datetime | str) -> datetime:
    if isinstance(d, str):  # SQLite's min() over a union hands back the stored text
        d = datetime.fromisoformat(d)
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def finished_within(*, session: Session, seconds: float) -> dict[tuple[str, str], int]:
    """(modality, final status) -> jobs that finished in the last ``seconds`` (database
    clock): the window `mmq top` takes its failure ratio over."""
    rows = session.execute(
        select(Job.modality, Job.status, func.count())
        .where(Job.finished_at >= db_now(-seconds))
        .group_by(Job.modality, Job.status))
    return {(m, st): n for m, st, n in rows}
