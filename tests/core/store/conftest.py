"""The store on both databases: each test gets a migrated SQLite file or a fresh
PostgreSQL database."""

import uuid

import pytest

from core import store
from core.store.migrations import upgrade
from tests.helpers import pg_database as _pg_database
from tests.helpers import pg_drop as _pg_drop


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
        name = None
    else:
        name = f"mmq_store_{uuid.uuid4().hex[:10]}"
        url = _pg_database(name)
    upgrade(url)
    upgrade(url)  # idempotent: already at head
    engine = store.make_engine(url)
    yield store.session_factory(engine)
    engine.dispose()
    if name:
        _pg_drop(name)
