"""Workers whose wall clocks disagree, end to end: one text worker 10 minutes fast
and one 10 minutes slow (``faketime``, monotonic clock untouched), as hosts without
NTP would be. Nothing may depend on either clock: deadlines, leases, the sweep's ages
and the stamps search catches up on all come from the database's clock.

Before that was so, a third of the jobs with a 300 s timeout were cancelled by the
fast worker ("deadline passed before it ran"), the slow worker's lease looked 10
minutes stale to everyone else (its running jobs re-run), and search stopped seeing
new results once it had loaded one stamped by the fast worker.
"""

from __future__ import annotations

import shutil
from datetime import UTC, timedelta
from pathlib import Path

import pytest

from core import store
from core.search import SearchConfig, SearchEngine
from producer.sdk import Client
from tests.helpers import pg_database, pg_drop, service_env

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
pytestmark = pytest.mark.skipif(
    not LIBFAKETIME.exists() or shutil.which("faketime") is None,
    reason="needs faketime (Debian package faketime; .ci/run installs it)")


@pytest.fixture(scope="module")
def database_url():
    """PostgreSQL only: its server's clock is the one clock of a fleet. SQLite's is
    the clock of whichever process runs the statement, which is why SQLite is for
    one host (where processes do not disagree)."""
    import uuid

    name = f"mmq_clocks_{uuid.uuid4().hex[:10]}"
    yield pg_database(name)
    pg_drop(name)


def skewed(env: dict, offset: str) -> dict:
    """The worker's wall clock moved by ``offset`` (e.g. "+10m"); monotonic untouched."""
    return {**env, "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": offset,
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def _aware(d):
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def test_workers_with_skewed_clocks_agree_on_deadlines_leases_and_stamps(
        broker_url, database_url, start_worker):
    env = service_env(broker_url, database_url, MMQ_LEASE_S=6, MMQ_LEASE_RENEW_S=1,
                      MMQ_REQUEUE_EVERY_S=1)
    fast = start_worker("text", skewed(env, "+10m"))
    slow = start_worker("text", skewed(env, "-10m"))
    client = Client(broker_url=broker_url, database_url=database_url)
    engine = SearchEngine(client.sessions, SearchConfig(refresh_s=0, background_build=False))
    try:
        first = client.submit_many([{"modality": "text", "input": f"first {i}",
                                     "timeout_s": 300} for i in range(40)])
        jobs = client.wait(first, timeout=180, with_embedding=False)
        assert engine.refresh(force=True) == 40
        second = client.submit_many([{"modality": "text", "input": f"second {i}",
                                      "timeout_s": 300} for i in range(40)])
        jobs += client.wait(second, timeout=180, with_embedding=False)
        # Search's catch-up sees every new result, whichever worker stamped it.
        assert engine.refresh(force=True) == 40
        with client.sessions() as s:
            now = store.db_time(session=s)
            live = store.live_workers(session=s, lease=timedelta(seconds=6), modality="text")
    finally:
        client.close()
    bad = [(j["status"], j["error"]) for j in jobs if j["status"] != "succeeded"]
    assert not bad, bad[:5]  # none cancelled by a fast clock's idea of the deadline
    assert all(j["attempts"] == 1 for j in jobs)  # none taken from a "stale" slow lease
    workers = {j["worker"].split(".")[0] for j in jobs}
    assert workers == {f"text-{fast.proc.pid}", f"text-{slow.proc.pid}"}, workers
    assert len(live) == 2, live  # both leases live by the database's clock
    for j in jobs:  # every stamp from the one clock: none in the future
        for stamp in (j["created_at"], j["started_at"], j["finished_at"]):
            from datetime import datetime

            assert _aware(datetime.fromisoformat(stamp)) <= now + timedelta(seconds=1)
