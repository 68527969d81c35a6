"""Store functions for sign-ins to the results page (producer/ui/session.py).

A signed cookie proves who signed in; this table says whether that sign-in is still
on. Sign-out deletes the row, so the cookie is refused by every API process at once,
whichever host it reaches. Expiry is decided by the database server's clock, in the
statement, never by comparing two hosts' clocks.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import ColumnElement, delete, func, insert, select
from sqlalchemy.orm import Session

from core.store.tables import UiSignin


def db_now(session: Session, plus: timedelta = timedelta(0)) -> ColumnElement:
    """The database server's current time plus ``plus``, as an SQL expression."""
    if session.get_bind().dialect.name == "sqlite":
        # SQLite keeps DateTime as 'YYYY-MM-DD HH:MM:SS.ffffff' text, in UTC; this is
        # the same layout (milliseconds), so the two compare as strings do.
        return func.strftime("%Y-%m-%d %H:%M:%f", "now",
                             f"{plus.total_seconds():+.3f} seconds")
    return func.now() + plus


def open_signin(*, session: Session, nonce: str, lifetime: timedelta) -> None:
    """Record a new sign-in that lasts ``lifetime``; expired ones are pruned here."""
    session.execute(delete(UiSignin).where(UiSignin.expires_at < db_now(session)))
    session.execute(insert(UiSignin).values(nonce=nonce,
                                            expires_at=db_now(session, lifetime)))


def signin_live(*, session: Session, nonce: str) -> bool:
    """Signed in, not signed out, not expired."""
    return session.scalar(select(func.count()).select_from(UiSignin).where(
        UiSignin.nonce == nonce, UiSignin.expires_at > db_now(session))) == 1


def close_signin(*, session: Session, nonce: str) -> None:
    """Sign-out: the sign-in's cookie is refused from now on, everywhere."""
    session.execute(delete(UiSignin).where(UiSignin.nonce == nonce))
