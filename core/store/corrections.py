"""Store functions for corrections: the right label of a finished classify job, as its
owner marked it (results page, ``PUT /v1/jobs/{id}/correction``, ``Client.correct``),
and the corrected jobs ``mmq train --from-corrections`` learns from.

One row per job, keyed by the job's id: a new correction replaces the old one (an
upsert, so two people correcting at once leave one row, the later). History is not
kept: training wants the current word on each job, and who and when are of that word.
``corrected_at`` is the database server's clock. Who may correct which job is the
producer's decision (producer/web/corrections.py); these functions check only what the
job itself allows: it exists, it is a classify job, and it succeeded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from core.jobs import JobStatus
from core.params import label_text
from core.store.db import _insert_for
from core.store.tables import Correction, Job, Prediction, db_now, unindexed

VIA = ("ui", "api", "sdk")
MAX_LABEL = 255  # the column's width


class CorrectionRefused(ValueError):
    """This job cannot be corrected: ``kind`` says why (an API maps it to 404 or 409)."""

    NOT_FOUND, CONFLICT = "not_found", "conflict"

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class CorrectedJob:
    """A corrected job as training reads it: its input and its right label."""

    job_id: str
    label: str
    text: str | None  # text jobs
    payload_sha256: str | None  # image and audio jobs: the bytes are in ``blobs``


def correctable(job: Job | None, job_id: str) -> Job:
    """The job, if a correction may be recorded on it; else ``CorrectionRefused``."""
    if job is None:
        raise CorrectionRefused(f"no job {job_id!r}", CorrectionRefused.NOT_FOUND)
    if job.task != "classify":
        raise CorrectionRefused(f"job {job_id} is a {job.task} job; only classify jobs have "
                                "a label to correct", CorrectionRefused.CONFLICT)
    if job.status != JobStatus.SUCCEEDED.value:
        raise CorrectionRefused(f"job {job_id} is {job.status}; only a classify job that "
                                "succeeded can be corrected", CorrectionRefused.CONFLICT)
    return job


def set_correction(*, session: Session, job_id: str, label: str, by: str,
                   via: str) -> Correction:
    """Record ``label`` as the job's right label (one of the job's labels or a new one),
    replacing any earlier correction -> the row as stored."""
    if via not in VIA:
        raise ValueError(f"via must be one of {VIA}, got {via!r}")
    label = label_text(label)
    if not label or len(label) > MAX_LABEL:
        raise ValueError(f"a correction's label is 1-{MAX_LABEL} characters, got {label!r}")
    correctable(session.get(Job, job_id), job_id)
    labels = session.scalar(select(Prediction.labels).where(Prediction.job_id == job_id))
    predicted = str(labels[0][0])[:MAX_LABEL] if labels else None
    values = {"label": label, "predicted": predicted, "corrected_by": by[:64], "via": via,
              "corrected_at": db_now()}
    insert = _insert_for(session)
    session.execute(insert(Correction).values(job_id=job_id, **values)
                    .on_conflict_do_update(index_elements=["job_id"], set_=values))
    session.flush()
    return session.scalars(select(Correction).where(Correction.job_id == job_id)
                           .execution_options(populate_existing=True)).one()


def get_correction(*, session: Session, job_id: str) -> Correction | None:
    return session.get(Correction, job_id, populate_existing=True)


def corrections_by_job(*, session: Session, job_ids: list[str]) -> dict[str, Correction]:
    """The corrections of these jobs (a page of the results list), by job id."""
    if not job_ids:
        return {}
    return {c.job_id: c for c in session.scalars(
        select(Correction).where(Correction.job_id.in_(job_ids)))}


def delete_correction(*, session: Session, job_id: str) -> bool:
    """Withdraw a job's correction; False if it had none."""
    return session.execute(delete(Correction).where(Correction.job_id == job_id)).rowcount > 0


def _corrected_of(q, modality: str | None, owner: str | None):
    """``q`` (corrections joined to their jobs) narrowed to the corrected jobs that
    train: succeeded classify jobs (of ``modality``, of ``owner``). The corrections
    drive it, each job found by its id: the jobs' columns are tested ``unindexed``
    (core/store/tables.py), or a planner without statistics reads every succeeded job
    of the modality through ``ix_jobs_modality_status`` and probes each for a
    correction (57x the SQLite steps at 1,000 succeeded jobs than at 10, with none
    corrected)."""
    q = q.where(unindexed(Job.task) == "classify",
                unindexed(Job.status) == JobStatus.SUCCEEDED.value)
    if modality is not None:
        q = q.where(unindexed(Job.modality) == modality)
    return q if owner is None else q.where(unindexed(Job.owner) == owner)


def _corrected(modality: str, owner: str | None):
    return _corrected_of(select(Job.id, Correction.label, Job.text, Job.payload_sha256)
                         .select_from(Correction).join(Job, Job.id == Correction.job_id),
                         modality, owner)


def corrected_jobs(*, session: Session, modality: str,
                   owner: str | None = None) -> Iterator[CorrectedJob]:
    """Every corrected classify job of ``modality`` (with ``owner``: that key id's), in
    the order they were corrected: training data, streamed (blobs are read one by one
    by the caller, never all at once)."""
    q = _corrected(modality, owner).order_by(Correction.corrected_at, Job.id)
    for job_id, label, text, sha in session.execute(q.execution_options(yield_per=500)):
        yield CorrectedJob(job_id, label, text, sha)


def count_corrections(*, session: Session, modality: str | None = None,
                      owner: str | None = None) -> dict[str, int]:
    """{modality: corrected jobs} (only ``modality`` when given)."""
    # Grouped by the index's column, SQLite scanned that index; with the corrections'
    # own key usable for the join, it scanned the jobs and probed corrections.
    m = unindexed(Job.modality)
    q = (select(m, func.count()).select_from(Correction)
         .join(Job, Job.id == unindexed(Correction.job_id)).group_by(m))
    return dict(session.execute(_corrected_of(q, modality, owner)).all())


__all__ = ["VIA", "CorrectedJob", "CorrectionRefused", "correctable", "corrected_jobs",
           "corrections_by_job", "count_corrections", "delete_correction", "get_correction",
           "set_correction"]
