"""The webhook outbox (core/webhooks/ delivers it): events written in the transaction
that ends their job, claimed by delivery threads under a lease, and each attempt.

Every time here is the database's clock (``db_now``): when a delivery is due, when a
claim's lease runs out, and when an event is too old to retry. Several processes on
several hosts claim from the same table; on PostgreSQL the claim skips rows another
process has locked (``FOR UPDATE SKIP LOCKED``), on SQLite the single writer
serialises the claims.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import case, func, insert, select, update
from sqlalchemy.orm import Session

from core.store.db import _insert_for
from core.store.tables import WebhookAttempt, WebhookDelivery, db_now

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
_D = WebhookDelivery.__table__


def webhook_id(job_id: str) -> str:
    """The event's ``webhook-id``: one event per job (a job ends once)."""
    return f"msg_{job_id}"


def enqueue_webhooks(*, session: Session, ended: list[tuple[str, str, str | None]]) -> int:
    """Outbox rows for jobs that just ended, in the caller's transaction (the one that
    ends them): ``ended`` is (job id, its new status, its webhook_url) as the ending
    ``UPDATE ... RETURNING`` gave them; jobs without a URL are skipped. One INSERT for
    all of them; a row that exists already is left alone (a job ends once, so only a
    replayed write could meet one). -> the rows asked for."""
    rows = [{"id": webhook_id(j), "job_id": j, "event": f"job.{status}", "url": url}
            for j, status, url in ended if url]
    if not rows:
        return 0
    stmt = _insert_for(session)(_D).values(status=PENDING, attempts=0, created_at=db_now(),
                                           next_at=db_now())
    session.execute(stmt.on_conflict_do_nothing(index_elements=["id"]), rows)
    return len(rows)


@dataclass(frozen=True)
class Claimed:
    """A delivery this process may attempt until its lease runs out."""

    id: str
    job_id: str
    event: str
    url: str
    attempts: int  # before this one
    claim: str  # the token that fences this claim's record_attempt


def claim_due(*, session: Session, limit: int, lease_s: float) -> list[Claimed]:
    """Take up to ``limit`` due deliveries (pending, ``next_at`` passed, no live lease),
    oldest due first, leasing them for ``lease_s`` seconds: one UPDATE ... RETURNING
    whose row choice skips rows locked by another process's claim (PostgreSQL). A
    process that dies mid-delivery leaves a lease that runs out, and another takes it."""
    token = str(uuid.uuid4())
    is_due = (_D.c.status == PENDING, _D.c.next_at <= db_now(),
              (_D.c.lease_until.is_(None)) | (_D.c.lease_until < db_now()))
    # A read first: most turns find nothing, and on SQLite an UPDATE, even of no row,
    # takes the database's one write lock from the worker's writer.
    if session.execute(select(_D.c.id).where(*is_due).limit(1)).first() is None:
        return []
    due = (select(_D.c.id).where(*is_due).order_by(_D.c.next_at).limit(limit)
           .with_for_update(skip_locked=True))
    rows = session.execute(
        update(_D).where(_D.c.id.in_(due.scalar_subquery()))
        .values(lease_until=db_now(lease_s), claim=token)
        .returning(_D.c.id, _D.c.job_id, _D.c.event, _D.c.url, _D.c.attempts)).all()
    return [Claimed(r.id, r.job_id, r.event, r.url, r.attempts, token) for r in rows]


def record_attempt(*, session: Session, claimed: Claimed, status_code: int | None,
                   error: str | None, duration_ms: float, retry_in_s: float,
                   retry_for_s: float) -> str | None:
    """Log one attempt and move the delivery on: ``delivered`` on a 2xx; else due again
    in ``retry_in_s``, or ``failed`` once the event is ``retry_for_s`` old. Fenced by
    the claim: an attempt whose lease ran out and was claimed again changes nothing
    (its row in ``webhook_attempts`` is still written: it did happen). -> the new
    status, or None when the claim was lost."""
    ok = status_code is not None and 200 <= status_code < 300
    number = claimed.attempts + 1
    session.execute(insert(WebhookAttempt).values(
        delivery_id=claimed.id, number=number, at=db_now(), status_code=status_code,
        error=None if error is None else error[:2000], duration_ms=duration_ms))
    expired = _D.c.created_at < db_now(-retry_for_s)
    new_status = (DELIVERED if ok else
                  case((expired, FAILED), else_=PENDING))
    row = session.execute(
        update(_D).where(_D.c.id == claimed.id, _D.c.claim == claimed.claim,
                         _D.c.status == PENDING)
        .values(status=new_status, attempts=_D.c.attempts + 1, lease_until=None,
                claim=None, next_at=db_now(retry_in_s),
                delivered_at=db_now() if ok else None,
                last_error=None if ok else (error or f"HTTP {status_code}")[:2000])
        .returning(_D.c.status)).first()
    return None if row is None else row.status


def job_webhooks(*, session: Session, job_id: str) -> list[dict]:
    """The job's deliveries (at most one today: one event per job), each with its
    attempts in order, for ``GET /v1/jobs/{id}/webhooks`` and the results page."""
    ds = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                         .order_by(WebhookDelivery.created_at)).all()
    if not ds:
        return []
    attempts = session.scalars(select(WebhookAttempt)
                               .where(WebhookAttempt.delivery_id.in_([d.id for d in ds]))
                               .order_by(WebhookAttempt.delivery_id,
                                         WebhookAttempt.number, WebhookAttempt.id)).all()
    ts = lambda d: d.isoformat() if d else None  # noqa: E731
    out = []
    for d in ds:
        out.append({
            "id": d.id, "event": d.event, "url": d.url, "status": d.status,
            "attempts": d.attempts, "created_at": ts(d.created_at),
            "next_attempt_at": ts(d.next_at) if d.status == PENDING else None,
            "delivered_at": ts(d.delivered_at), "last_error": d.last_error,
            "history": [{"number": a.number, "at": ts(a.at), "status_code": a.status_code,
                         "error": a.error, "duration_ms": round(a.duration_ms, 1)}
                        for a in attempts if a.delivery_id == d.id],
        })
    return out


def webhook_counts(*, session: Session) -> dict[str, int]:
    """Deliveries by state, for the metrics: ``pending`` (not yet tried or due again),
    ``failing`` (pending after at least one failed attempt), ``failed`` (given up).
    Delivered rows are not counted (they only grow)."""
    rows = session.execute(
        select(_D.c.status, func.count(), func.sum(case((_D.c.attempts > 0, 1), else_=0)))
        .where(_D.c.status.in_([PENDING, FAILED])).group_by(_D.c.status)).all()
    out = {"pending": 0, "failing": 0, "failed": 0}
    for status, n, tried in rows:
        if status == PENDING:
            out["pending"], out["failing"] = int(n), int(tried or 0)
        elif status == FAILED:
            out["failed"] = int(n)
    return out
