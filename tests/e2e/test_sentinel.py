"""Broker failover: the Redis primary SIGKILLed under a real worker, Sentinel promotes
the replica, and every job still succeeds once.

A primary, a replica and three Sentinels (quorum 2, down after 1 s) of this test's own;
a real text worker and the SDK given the ``sentinel://`` URL. The primary is killed for
real: a forced ``SENTINEL FAILOVER`` closes clients politely and hides the case Celery
#6348 reports (workers that do not follow a failover when the primary's connection is
lost). Admission, the sweep and the API's readiness then run against the new primary.
"""

from __future__ import annotations

import logging
import shutil
import signal
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from bench.faults import SentinelCluster
from core import store
from core.broker.admission import release_room, reserve_room
from core.broker.queues import SWEEP_LOCK
from core.broker.redis_client import redis_for
from core.config import Settings
from core.training.samples import sentences
from producer.api import create_app
from producer.sdk import Client
from tests.helpers import service_env

log = logging.getLogger(__name__)

pytestmark = pytest.mark.skipif(not shutil.which("redis-sentinel"),
                                reason="redis-sentinel is not installed (Debian: redis-sentinel)")

# Short leases and a fast sweep, as in test_recovery.py: the logic is the same.
FAST = {"MMQ_LEASE_S": 3, "MMQ_LEASE_RENEW_S": 0.5, "MMQ_REQUEUE_EVERY_S": 1,
        "MMQ_REQUEUE_STALE_S": 5}


@pytest.fixture
def cluster(tmp_path):
    c = SentinelCluster(tmp_path / "redis")
    yield c
    c.close()


def _first_done(client: Client, ids: list[str], timeout: float) -> float:
    """Seconds on the monotonic clock when any of ``ids`` had succeeded."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with client.sessions() as s:
            if s.scalar(select(func.count()).select_from(store.Job).where(
                    store.Job.id.in_(ids), store.Job.status == "succeeded")):
                return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError("no job finished")


def _unfinished_after(client: Client, ids: list[str]) -> int:
    with client.sessions() as s:
        return s.scalar(select(func.count()).select_from(store.Job).where(
            store.Job.id.in_(ids), store.Job.status != "succeeded"))


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_jobs_flow_after_the_primary_is_lost(fault, cluster, tmp_path, start_worker):
    db = f"sqlite:///{tmp_path / 'mmq.db'}"
    settings = Settings(broker_url=cluster.url, database_url=db,
                        sentinel_master=cluster.MASTER,
                        **{k[4:].lower(): v for k, v in FAST.items()})
    env = service_env(cluster.url, db, MMQ_SENTINEL_MASTER=cluster.MASTER, **FAST)
    cluster.wait_ready()
    client = Client(settings=settings)
    start_worker("text", env, concurrency=8)
    api = TestClient(create_app(settings, client))
    r = redis_for(settings, socket_timeout=2)
    release_room(r, reserve_room(r, {"text": 1}, 10_000))  # its script is on the old primary

    before = client.submit_many([{"modality": "text", "input": t}
                                 for t in sentences(150, seed=21, median_words=30)])
    client.wait(before[:3], timeout=120, with_embedding=False)
    assert _unfinished_after(client, before) > 0, "all done before the kill: proves nothing"
    killed = time.monotonic()
    cluster.kill_primary(fault)
    cluster.wait_promoted()
    promoted = time.monotonic()
    after = client.submit_many([{"modality": "text", "input": t}
                                for t in sentences(50, seed=22, median_words=30)])
    first_after = _first_done(client, after, timeout=60)
    res = client.wait(before + after, timeout=120, with_embedding=False)
    log.warning("failover: promoted %.1f s after the kill; the first job submitted after "
                "it succeeded %.1f s after the kill; all %d done %.1f s after it",
                promoted - killed, first_after - killed, len(res), time.monotonic() - killed)

    assert [x["status"] for x in res] == ["succeeded"] * len(res)
    with client.sessions() as s:
        predictions = dict(s.execute(
            select(store.Prediction.job_id, func.count()).group_by(store.Prediction.job_id)).all())
    assert {i: predictions.get(i, 0) for i in before + after} == {i: 1 for i in before + after}

    # mmq's own Redis work follows the new primary: admission (its script re-loaded
    # there: NOSCRIPT), the API's readiness, and the workers' sweep (its turn lock).
    new = redis_for(settings, socket_timeout=2)
    assert new.connection_pool.get_master_address()[1] == cluster.ports["replica"]
    new.script_flush()
    room = reserve_room(new, {"text": 3}, 10_000)
    assert room.admitted and new.hlen("mmq:admit:text") == 1
    release_room(new, room)
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.json()
    end = time.monotonic() + 10
    while not new.exists(SWEEP_LOCK + "text") and time.monotonic() < end:
        time.sleep(0.1)
    assert new.exists(SWEEP_LOCK + "text"), "no worker swept on the new primary"
