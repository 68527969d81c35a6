"""Idempotency-Keys: the job ids an earlier call with the same key made."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from core.store.tables import IdempotencyKey


def get_idempotency(*, session: Session, key: str) -> IdempotencyKey | None:
    return session.get(IdempotencyKey, key)


def put_idempotency(*, session: Session, key: str, request_hash: str, job_ids: list[str],
                    created_at: datetime) -> None:
    """Record the key with the jobs it made, in the caller's transaction (the key exists
    iff the jobs do); a concurrent call with the same key fails the commit with an
    ``IntegrityError``."""
    session.add(IdempotencyKey(key=key, request_hash=request_hash, job_ids=job_ids,
                               created_at=created_at))
