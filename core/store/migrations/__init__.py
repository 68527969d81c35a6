"""Alembic migrations for the results store; ``upgrade(url)`` applies them."""

from __future__ import annotations

import fcntl
import logging
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import make_url

HERE = Path(__file__).parent


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextmanager
def _migration_lock(url: str):
    """Several workers may start at once; only one may migrate at a time."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        with open(f"{u.database}.migrate-lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield
        return
    if u.get_backend_name() == "postgresql":
        from core.store import make_engine

        engine = make_engine(url)
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(727274)"))  # any fixed key
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(727274)"))
        engine.dispose()
        return
    yield


def upgrade(url: str, revision: str = "head") -> None:
    # Alembic announces each of its plugins at INFO on every upgrade: noise in every
    # worker's and the API's log.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    with _migration_lock(url):
        command.upgrade(alembic_config(url), revision)
