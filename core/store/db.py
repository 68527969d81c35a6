"""The store's connection-level helpers: is the database reachable, what time is it
there, and the dialect's INSERT (for the upserts)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from core.store.tables import db_now


def unreachable(e: BaseException) -> bool:
    """The database went away (refused, cut, timed out, locked), as opposed to a bad
    statement or bad data, which would fail the same way again: worth a retry, and
    an HTTP 503 rather than a 500."""
    if isinstance(e, OperationalError | InterfaceError):
        return True
    return isinstance(e, DBAPIError) and bool(e.connection_invalidated)


def ping(engine: Engine) -> None:
    """One round trip on a new connection; raises (a driver error) if the database does
    not answer."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def db_time(*, session: Session) -> datetime:
    """The database server's clock now (timezone-aware): one round trip, for a caller
    that stamps many rows or asks "how long ago" (see ``db_now``)."""
    return _aware(session.scalar(select(db_now())))


def _aware(d: datetime) -> datetime:
    return d if d.tzinfo else d.replace(tzinfo=UTC)  # SQLite returns naive UTC


def _insert_for(session: Session):
    return insert_for(session.get_bind().dialect.name)


def insert_for(dialect: str):
    """The ``insert`` construct (with ``on_conflict_*``) of a database kind, by name."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - the store supports these two
        raise RuntimeError(f"unsupported database dialect {dialect}")
    return insert
