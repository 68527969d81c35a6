"""Counts and histories for the metrics and dashboards."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.store.tables import (
    Job,
)


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
