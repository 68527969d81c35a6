"""Idempotency-Keys: the job ids an earlier call with the same key made."""

from __future__ import annotations

from sqlalchemy.orm import Session

from core.store.tables import (
    IdempotencyKey,
)


def get_idempotency(*, session: Session, key: str) -> IdempotencyKey | None:
    return session.get(IdempotencyKey, key)
