"""Counts and histories for the metrics and dashboards."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.jobs import JobStatus
from core.store.tables import Job, Prediction, db_now


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
