"""Jobs as producers see them: create, read, list (keyset pages), cancel, mark sent;
and the queued jobs whose message may have been lost (the sweep)."""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import case, func, insert, select, update
from sqlalchemy.orm import Session

from core.jobs import TERMINAL, JobStatus
from core.store.blobs import put_blob
from core.store.db import db_time
from core.store.tables import (
    ACTIVE,
    Job,
    Prediction,
    db_now,
    unindexed,
)
from core.store.webhooks import enqueue_webhooks


def create_job(*, session: Session, modality: str, task: str, params: dict | None = None,
               text: str | None = None, payload: bytes | None = None,
               deadline: datetime | None = None, timeout_s: float | None = None,
               job_id: str | None = None, owner: str | None = None,
               model_version: str | None = None, now: datetime | None = None,
               webhook_url: str | None = None, webhook_embedding: bool = False) -> Job:
    """A queued job. ``model_version`` is the version the caller named (checked by the
    producer); None = whichever is promoted when a worker starts it. ``timeout_s`` sets
    the deadline from the database's clock (it wins over ``deadline``, an instant the
    caller chose); ``now`` is ``db_time`` read once for a batch of jobs."""
    now = now or db_time(session=session)
    job = Job(**_job_row(session, now, owner, dict(
        modality=modality, task=task, params=params, text=text, payload=payload,
        deadline=deadline, timeout_s=timeout_s, job_id=job_id, model_version=model_version,
        webhook_url=webhook_url, webhook_embedding=webhook_embedding)))
    session.add(job)
    return job


def create_jobs(*, session: Session, rows: list[dict], owner: str | None = None,
                now: datetime | None = None) -> list[tuple[str, str]]:
    """Many queued jobs in one INSERT: each row takes ``create_job``'s keyword arguments
    (but ``session``, ``owner``, ``now``) -> (id, modality) per row, in order. No ORM
    objects: building and flushing one per job was most of a producer's CPU per job
    (bench/submit.py)."""
    now = now or db_time(session=session)
    values = [_job_row(session, now, owner, row) for row in rows]
    if values:
        session.execute(insert(Job), values)
    return [(v["id"], v["modality"]) for v in values]


_JOB_ARGS = frozenset({"modality", "task", "params", "text", "payload", "deadline",
                       "timeout_s", "job_id", "model_version", "webhook_url",
                       "webhook_embedding"})


def _job_row(session: Session, now: datetime, owner: str | None, row: dict) -> dict:
    """The ``jobs`` columns of a queued job from ``create_job``'s arguments; an image or
    audio payload is stored (once per sha256) on the way."""
    if unknown := set(row) - _JOB_ARGS:
        raise TypeError(f"unexpected job arguments {sorted(unknown)}")
    deadline = row.get("deadline")
    if row.get("timeout_s") is not None:
        deadline = now + timedelta(seconds=row["timeout_s"])
    payload = row.get("payload")
    return {
        "id": row.get("job_id") or str(uuid.uuid4()), "modality": row["modality"],
        "task": row["task"], "params": row.get("params") or {},
        "status": JobStatus.QUEUED.value, "text": row.get("text"),
        "payload_sha256": None if payload is None else put_blob(session=session, data=payload),
        "deadline": deadline, "attempts": 0, "created_at": now, "owner": owner,
        "model_version": row.get("model_version"), "webhook_url": row.get("webhook_url"),
        "webhook_embedding": bool(row.get("webhook_embedding", False)),
    }


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


def cancel_job(*, session: Session, job_id: str, owner: str | None = None) -> bool:
    """queued or running -> cancelled, at once. A running attempt is not interrupted:
    its outcome finds the job no longer held and is dropped (``finish_jobs``), and its
    worker drops it from a batch that has not started. False if the job is already
    terminal (or unknown). With ``owner``, only a job that key id made."""
    jobs = Job.__table__
    q = update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(ACTIVE))
    if owner is not None:
        q = q.where(jobs.c.owner == owner)
    row = session.execute(
        q.values(status=JobStatus.CANCELLED.value, finished_at=db_now(),
                 error=case((jobs.c.status == JobStatus.RUNNING.value,
                             "cancelled while running"), else_="cancelled before it ran"))
        .returning(jobs.c.id, jobs.c.webhook_url)).first()
    if row is None:
        return False
    # The webhook outbox, in this same transaction: an event exactly when the job ends.
    enqueue_webhooks(session=session, ended=[(row.id, JobStatus.CANCELLED.value,
                                              row.webhook_url)])
    return True


def cancelled_among(*, session: Session, job_ids: list[str]) -> list[str]:
    """Which of these (a worker's jobs in flight) were cancelled meanwhile."""
    if not job_ids:
        return []
    return list(session.scalars(select(Job.id).where(
        Job.id.in_(job_ids), unindexed(Job.status) == JobStatus.CANCELLED.value)))


def list_jobs(*, session: Session, status: str | None = None, modality: str | None = None,
              since: datetime | None = None, limit: int = 100,
              before: tuple[datetime, str] | None = None,
              owner: str | None = None, task: str | None = None) -> list[Job]:
    """Newest first, keyset-paginated: ``before`` is the (created_at, id) of the last
    job of the previous page, so a page never skips or repeats a job as rows arrive
    (``encode_cursor`` makes it opaque for the API and the results page).
    With ``owner``, only the jobs that key id made (None: everyone's)."""
    q = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    if owner is not None:
        q = q.where(Job.owner == owner)
    if status:
        q = q.where(Job.status == status)
    if modality:
        q = q.where(Job.modality == modality)
    if task:
        q = q.where(Job.task == task)
    if since:
        q = q.where(Job.created_at >= since)
    if before:
        at, job_id = before
        q = q.where((Job.created_at < at) | ((Job.created_at == at) & (Job.id < job_id)))
    return list(session.scalars(q))


def encode_cursor(created_at: datetime, job_id: str) -> str:
    """A page cursor: the next page starts after this job (``list_jobs``' ``before``),
    at full precision (many jobs share a second). Opaque to clients."""
    raw = json.dumps([created_at.isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """-> (created_at in UTC, id); ValueError for anything ``encode_cursor`` did not make."""
    try:
        at, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        at = datetime.fromisoformat(str(at))
        return (at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)), str(job_id)
    except (ValueError, TypeError, OverflowError, binascii.Error):
        raise ValueError("not a page cursor this site issued") from None


def queued_among(*, session: Session, job_ids: list[str]) -> list[str]:
    """Which of these jobs are still ``queued``."""
    return list(session.scalars(select(Job.id).where(
        Job.id.in_(job_ids), unindexed(Job.status) == JobStatus.QUEUED.value)))


def jobs_by_id(*, session: Session, job_ids: list[str], owner: str | None = None) -> list[Job]:
    """The jobs among ``job_ids`` (with ``owner``, only that key id's; others are absent)."""
    if not job_ids:
        return []
    q = select(Job).where(Job.id.in_(job_ids))
    if owner is not None:
        q = q.where(Job.owner == owner)
    return list(session.scalars(q))


def prediction_summaries(*, session: Session, job_ids: list[str]) -> dict[str, tuple]:
    """(labels, text, dim) by job id: what a person reads, never the embedding's bytes."""
    if not job_ids:
        return {}
    q = select(Prediction.job_id, Prediction.labels, Prediction.text, Prediction.dim).where(
        Prediction.job_id.in_(job_ids))
    return {r[0]: tuple(r[1:]) for r in session.execute(q)}


def predictions_by_id(*, session: Session, job_ids: list[str]) -> dict[str, Prediction]:
    """The stored predictions of these jobs, by job id (jobs without one are absent)."""
    if not job_ids:
        return {}
    q = select(Prediction).where(Prediction.job_id.in_(job_ids))
    return {p.job_id: p for p in session.scalars(q)}


def job_statuses(*, session: Session, job_ids: list[str],
                 owner: str | None = None) -> dict[str, str]:
    """The status of each of these jobs that exists (with ``owner``: that key id's)."""
    q = select(Job.id, Job.status).where(Job.id.in_(job_ids))
    if owner is not None:
        q = q.where(Job.owner == owner)
    return {job_id: status for job_id, status in session.execute(q)}


def job_states(*, session: Session, job_ids: list[str],
               owner: str | None = None) -> dict[str, tuple[str, int, bool]]:
    """(status, attempts, ever started) of each of these jobs that exists (with
    ``owner``: that key id's): what a job event stream compares turn to turn."""
    q = select(Job.id, Job.status, Job.attempts, Job.started_at.is_not(None)).where(
        Job.id.in_(job_ids))
    if owner is not None:
        q = q.where(Job.owner == owner)
    return {r[0]: (r[1], int(r[2] or 0), bool(r[3])) for r in session.execute(q)}


def wait_statuses(sessions, job_ids: list[str], *, timeout: float, poll: float,
                  max_poll: float, owner: str | None = None) -> dict[str, str | None]:
    """Poll until every job is terminal or ``timeout`` seconds have passed, sleeping
    ``poll`` s after the first read and 1.5 times longer each turn up to ``max_poll``
    (quick for fast jobs, cheap for slow ones). Only the jobs not yet terminal are
    read again. -> each job's last status (None: no such job, or not ``owner``'s: it
    never finishes, as if unknown)."""
    if not timeout >= 0:  # NaN too: time.monotonic() > nan is never true, a wait for ever
        raise ValueError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
    end = time.monotonic() + timeout
    last: dict[str, str | None] = dict.fromkeys(job_ids)
    pending = set(last)
    while pending:
        with sessions() as s:
            last.update(job_statuses(session=s, job_ids=list(pending), owner=owner))
        pending = {j for j in pending if last[j] not in TERMINAL}
        if not pending or time.monotonic() > end:
            break
        time.sleep(poll)
        poll = min(poll * 1.5, max_poll)
    return last


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
