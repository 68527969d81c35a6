"""Sign-ins to the results page in the store, on SQLite and PostgreSQL: live until
signed out or expired by the database's clock; expired rows are pruned."""

from datetime import timedelta

from sqlalchemy import func, select

from core.store import ui_signins
from core.store.tables import UiSignin

HOUR = timedelta(hours=1)


def _rows(sessions) -> int:  # noqa: F811
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(UiSignin))


def test_a_signin_is_live_until_signed_out(sessions):  # noqa: F811
    with sessions.begin() as s:
        ui_signins.open_signin(session=s, nonce="n1", lifetime=HOUR)
        ui_signins.open_signin(session=s, nonce="n2", lifetime=HOUR)
    with sessions() as s:
        assert ui_signins.signin_live(session=s, nonce="n1")
        assert not ui_signins.signin_live(session=s, nonce="never")
    with sessions.begin() as s:
        ui_signins.close_signin(session=s, nonce="n1")
    with sessions() as s:
        assert not ui_signins.signin_live(session=s, nonce="n1")
        assert ui_signins.signin_live(session=s, nonce="n2")


def test_expiry_is_the_databases_clock_and_expired_rows_are_pruned(sessions):  # noqa: F811
    with sessions.begin() as s:
        ui_signins.open_signin(session=s, nonce="old", lifetime=-timedelta(seconds=1))
    with sessions() as s:
        assert not ui_signins.signin_live(session=s, nonce="old")
    assert _rows(sessions) == 1
    with sessions.begin() as s:  # the next sign-in prunes it
        ui_signins.open_signin(session=s, nonce="new", lifetime=HOUR)
    assert _rows(sessions) == 1
    with sessions() as s:
        assert ui_signins.signin_live(session=s, nonce="new")
