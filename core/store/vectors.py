"""What the search engine reads (core/search/engine.py): the stored predictions'
vectors with the job fields its filters use, in keyset pages by (finished_at, id) or
by id; the ids finished inside its catch-up window; and the summaries of its hits."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from core.jobs import JobStatus
from core.store.tables import Job, Prediction


def _vector_rows():
    return (select(Job.id, Job.modality, Job.task, Job.owner, Job.created_at,
                   Job.finished_at, Job.params, Prediction.embedding, Prediction.dim,
                   Prediction.model_version, Prediction.labels)
            .join(Prediction, Prediction.job_id == Job.id)
            .where(Job.status == JobStatus.SUCCEEDED.value))


def vector_rows_after(*, session: Session, after: tuple[datetime, str] | None,
                      limit: int) -> list:
    """One page of succeeded jobs' vector rows ordered by (finished_at, id), starting
    after ``after`` (the last row of the previous page; None: the first page)."""
    q = _vector_rows().order_by(Job.finished_at, Job.id).limit(limit)
    if after is not None:
        at, jid = after
        q = q.where((Job.finished_at > at) |
                    ((Job.finished_at == at) & (Job.id > jid)))
    return session.execute(q).all()


def vector_rows(*, session: Session, job_ids: list[str]) -> list:
    """The vector rows of these jobs (those that succeeded)."""
    return session.execute(_vector_rows().where(Job.id.in_(job_ids))).all()


def succeeded_since(*, session: Session, since: datetime) -> list:
    """(id, finished_at) of the jobs that succeeded at or after ``since``."""
    return session.execute(select(Job.id, Job.finished_at)
                           .where(Job.status == JobStatus.SUCCEEDED.value,
                                  Job.finished_at >= since)).all()


def hit_summaries(*, session: Session, job_ids: list[str], chars: int) -> dict:
    """What a search hit shows, by job id, in one query: the job's fields, the first
    ``chars`` characters of its text and transcript, its labels and model version."""
    q = (select(Job.id, Job.modality, Job.task, Job.owner, Job.created_at,
                func.substr(Job.text, 1, chars).label("text"), Prediction.labels,
                func.substr(Prediction.text, 1, chars).label("transcript"),
                Prediction.model_version)
         .join(Prediction, Prediction.job_id == Job.id).where(Job.id.in_(job_ids)))
    return {r.id: r for r in session.execute(q)}


def stored_rows(*, session: Session, job_ids: list[str]) -> list:
    """(id, finished_at, embedding) of these jobs, those that succeeded (the search
    cache's check of its saved files against the database)."""
    return session.execute(select(Job.id, Job.finished_at, Prediction.embedding)
                           .join(Prediction, Prediction.job_id == Job.id)
                           .where(Job.status == JobStatus.SUCCEEDED.value,
                                  Job.id.in_(job_ids))).all()


def insert_results(*, session: Session, jobs: list[dict], predictions: list[dict]) -> None:
    """Bulk-insert stored results as rows, one executemany per table (bench/: a
    million stored vectors in minutes, not through a worker)."""
    session.execute(insert(Job), jobs)
    session.execute(insert(Prediction), predictions)
