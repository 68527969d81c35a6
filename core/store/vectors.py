"""What the search engine reads (core/search/engine.py): the stored predictions'
vectors with the job fields its filters use, in keyset pages by (finished_at, id) or
by id; the ids finished inside its catch-up window; and the summaries of its hits."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from core.jobs import JobStatus
from core.store.tables import Job, Prediction, unindexed

# The job's status is returned, not filtered, in the reads by finished_at: with
# ``status = 'succeeded'`` in the WHERE clause SQLite walks ix_jobs_status_created (every
# succeeded job) instead of ix_jobs_finished: at 1 M stored results a 2,000-row page of
# the first load took 30 s instead of 0.3 s (so the load was quadratic), and each
# catch-up 0.6 s instead of 2 ms. The few other jobs with a prediction are skipped by
# the caller (the search engine) or here.
SUCCEEDED = JobStatus.SUCCEEDED.value


def _vector_rows():
    return (select(Job.id, Job.modality, Job.task, Job.owner, Job.created_at,
                   Job.finished_at, Job.params, Job.status, Prediction.embedding,
                   Prediction.dim, Prediction.model_version, Prediction.labels)
            .join(Prediction, Prediction.job_id == Job.id))


def vector_rows_after(*, session: Session, after: tuple[datetime, str] | None,
                      limit: int) -> list:
    """One page of finished jobs' vector rows ordered by (finished_at, id), starting
    after ``after`` (the last row of the previous page; None: the first page). Rows
    whose ``status`` is not succeeded are the caller's to skip (see _vector_rows)."""
    q = _vector_rows().order_by(Job.finished_at, Job.id).limit(limit)
    if after is not None:
        at, jid = after
        # ">= at" first: a range on ix_jobs_finished the planner uses.
        q = q.where(Job.finished_at >= at, (Job.finished_at > at) | (Job.id > jid))
    else:
        q = q.where(Job.finished_at.is_not(None))
    return session.execute(q).all()


def vector_rows(*, session: Session, job_ids: list[str]) -> list:
    """The vector rows of these jobs (those that succeeded)."""
    return session.execute(_vector_rows().where(Job.id.in_(job_ids),
                                                unindexed(Job.status) == SUCCEEDED)).all()


def succeeded_since(*, session: Session, since: datetime) -> list:
    """(id, finished_at) of the jobs that succeeded at or after ``since``."""
    rows = session.execute(select(Job.id, Job.finished_at, Job.status)
                           .where(Job.finished_at >= since)).all()
    return [r for r in rows if r.status == SUCCEEDED]


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
                           .where(unindexed(Job.status) == SUCCEEDED,
                                  Job.id.in_(job_ids))).all()


def insert_results(*, session: Session, jobs: list[dict], predictions: list[dict]) -> None:
    """Bulk-insert stored results as rows, one executemany per table (bench/: a
    million stored vectors in minutes, not through a worker)."""
    session.execute(insert(Job), jobs)
    session.execute(insert(Prediction), predictions)
