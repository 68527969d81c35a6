"""No job stuck: worker leases, the sweep, and retries through outages.

Real redis-server, real worker processes, SQLite and PostgreSQL. The visibility
timeout stays at its default (an hour) in these tests, so nothing here is
recovered by kombu's own redelivery: only by the lease and the sweep.
"""

from __future__ import annotations

import signal
import time
import uuid

import pytest
import redis
from sqlalchemy import func, select, update

from bench.faults import TcpProxy
from core import store
from core.broker.queues import unacked_job_ids
from core.training.samples import sentences
from producer.sdk import Client
from tests.helpers import service_env

# Short leases and a fast sweep keep the tests quick; the logic is the same.
FAST = {"MMQ_LEASE_S": 3, "MMQ_LEASE_RENEW_S": 0.5, "MMQ_REQUEUE_EVERY_S": 1,
        "MMQ_REQUEUE_STALE_S": 5}


@pytest.fixture
def broker(broker_url):
    return broker_url


def _running(client: Client, ids: list[str]) -> int:
    with client.sessions() as s:
        return s.scalar(select(func.count()).select_from(store.Job).where(
            store.Job.id.in_(ids), store.Job.status == "running"))


def _kill_mid_run(client: Client, victim, ids: list[str]) -> int:
    client.wait(ids[:3], timeout=180, with_embedding=False)  # busy, far from done
    end = time.monotonic() + 60  # kill mid-job, not in the gap between two batches
    while time.monotonic() < end:
        # Frozen first, then looked at: a message's jobs (up to 64) finish in one commit,
        # and one that landed between a look and the kill left none running (seen in CI).
        # A statement already sent when it froze is given time to end at the database.
        victim.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.05)
        if _running(client, ids):
            break
        victim.proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    running = _running(client, ids)
    assert running >= 1, "the worker was killed between jobs; the test proves nothing"
    return running


def _assert_all_once(client: Client, ids: list[str], res: list[dict]) -> None:
    assert [r["status"] for r in res] == ["succeeded"] * len(ids)
    with client.sessions() as s:
        n = s.scalar(select(func.count()).select_from(store.Prediction)
                     .where(store.Prediction.job_id.in_(ids)))
    assert n == len(ids)


def test_killed_workers_running_jobs_are_rerun_by_another(broker, database_url, start_worker):
    env = service_env(broker, database_url, **FAST)
    victim = start_worker("text", env, concurrency=8)
    client = Client(broker_url=broker, database_url=database_url)
    ids = client.submit_many([{"modality": "text", "input": s}
                              for s in sentences(300, seed=3, median_words=40)])
    running = _kill_mid_run(client, victim, ids)
    start_worker("text", env, concurrency=8)
    # Without leases the killed worker's messages wait out the hour-long visibility
    # timeout, and this times out.
    res = client.wait(ids, timeout=240, with_embedding=False)
    _assert_all_once(client, ids, res)
    assert sum(r["attempts"] >= 2 for r in res) >= running


def test_a_worker_stopped_with_ctrl_c_twice_mid_run_exits_and_its_jobs_run(
        broker, database_url, start_worker):
    """A cold shutdown (SIGINT twice) left the task threads waiting on futures the stopped
    model process never resolves; the interpreter's exit joined them for up to 90 min,
    the metrics port still bound (found by an operator review). The process now exits,
    and another worker runs every job once."""
    env = service_env(broker, database_url, **FAST)
    victim = start_worker("text", env, concurrency=128)
    client = Client(broker_url=broker, database_url=database_url)
    ids = client.submit_many([{"modality": "text", "input": s}
                              for s in sentences(800, seed=5, median_words=60)])
    client.wait(ids[:3], timeout=180, with_embedding=False)
    victim.proc.send_signal(signal.SIGINT)  # warm shutdown: the running tasks finish...
    time.sleep(0.5)
    victim.proc.send_signal(signal.SIGINT)  # ...cold: they are left waiting
    victim.proc.wait(timeout=60)  # hung before (TimeoutExpired)
    start_worker("text", env, concurrency=128)
    res = client.wait(ids, timeout=240, with_embedding=False)
    _assert_all_once(client, ids, res)


def test_redis_emptied_and_worker_killed_nothing_stuck(broker, database_url, start_worker):
    """Redis restarted empty while a worker died: the running jobs have neither a
    message nor a worker; the queued ones have no message."""
    env = service_env(broker, database_url, **FAST)
    victim = start_worker("text", env, concurrency=8)
    client = Client(broker_url=broker, database_url=database_url)
    ids = client.submit_many([{"modality": "text", "input": s}
                              for s in sentences(300, seed=4, median_words=40)])
    _kill_mid_run(client, victim, ids)
    redis.Redis.from_url(broker).flushdb()
    start_worker("text", env, concurrency=8)
    res = client.wait(ids, timeout=240, with_embedding=False)
    _assert_all_once(client, ids, res)


def test_unacked_message_of_a_dead_worker_is_restored_not_resent(broker, database_url):
    """The sweep puts the dead worker's own message back (one message per job), and
    moves the job back to queued."""
    from core.broker.sweep import live_job_ids, sweep

    client = Client(broker_url=broker, database_url=database_url)
    job_id = client.submit_text("a job whose worker died")
    r = redis.Redis.from_url(broker)
    # What kombu does when a worker fetches: BRPOP, then record it as unacknowledged.
    raw = r.rpop("text")
    r.zadd("unacked_index", {"tag-1": time.time()})
    r.hset("unacked", "tag-1", f'[{raw.decode()}, "text", "text"]')
    with client.sessions.begin() as s:
        store.start_jobs(session=s, job_ids=[job_id], worker="text-1@gone")
        s.execute(update(store.Job).where(store.Job.id == job_id).values(
            started_at=store.utcnow().replace(year=2000)))
    settings = client.settings.model_copy(update={k[4:].lower(): v for k, v in FAST.items()})
    out = sweep(settings)
    assert out.restored == [job_id] and out.resent == []
    assert r.hlen("unacked") == 0 and r.llen("text") == 1
    assert live_job_ids(settings) == {job_id}
    assert client.get(job_id)["status"] == "queued"
    assert sweep(settings).total == 0  # it has a message now: nothing more to do


def test_a_worker_killed_in_its_first_seconds_has_its_fetched_jobs_put_back_by_its_lease(
        broker_url, start_worker, request):
    """A worker fetches jobs and dies before starting any (here its database link is
    cut, so it cannot mark them running): the jobs are ``queued``, their messages
    fetched and unacknowledged. The sweep of another worker puts them back as soon as
    the store says the dead one's lease expired. The stale-message path is switched
    off (requeue_stale_s of a day), so nothing else can recover them. Before, only
    that path could: after requeue_stale_s, judged on kombu's fetch time (the fetching
    host's wall clock), which made a worker killed early cost over a minute."""
    from tests.helpers import pg_database, pg_drop

    url = pg_database(name := f"mmq_e2e_{uuid.uuid4().hex[:10]}")
    request.addfinalizer(lambda: pg_drop(name))
    proxy = TcpProxy("127.0.0.1", 5432)
    request.addfinalizer(proxy.close)
    settings = {**FAST, "MMQ_REQUEUE_STALE_S": 86_400}
    victim = start_worker("text", service_env(broker_url, url.replace(
        "127.0.0.1:5432", proxy.address), **settings), concurrency=8)
    client = Client(broker_url=broker_url, database_url=url)
    proxy.down()
    ids = client.submit_many([{"modality": "text", "input": s}
                              for s in sentences(6, seed=6)])
    r = redis.Redis.from_url(broker_url)

    def fetched() -> list[str]:  # six jobs: one run_jobs message (MMQ_JOBS_PER_MESSAGE)
        return [j for raw in r.hvals("unacked") for j in unacked_job_ids(raw)]

    end = time.monotonic() + 60
    while len(fetched()) < len(ids) and time.monotonic() < end:
        time.sleep(0.05)
    assert sorted(fetched()) == sorted(ids), "the worker did not fetch every job"
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    proxy.up()
    assert {client.get(i)["status"] for i in ids} == {"queued"}  # fetched, never started
    start_worker("text", service_env(broker_url, url, **settings), concurrency=8)
    res = client.wait(ids, timeout=120, with_embedding=False)
    _assert_all_once(client, ids, res)
    assert [j["attempts"] for j in res] == [1] * len(ids)  # no orphan path: never started


def test_postgres_outage_fails_nothing(broker_url, start_worker, request):
    """Workers reach PostgreSQL through a proxy taken down for 12 s mid-run: every
    job still succeeds, none is left running. (Before: retries gave up after 7 s.)"""
    from tests.helpers import pg_database, pg_drop

    url = pg_database(name := f"mmq_e2e_{uuid.uuid4().hex[:10]}")
    request.addfinalizer(lambda: pg_drop(name))
    proxy = TcpProxy("127.0.0.1", 5432)
    request.addfinalizer(proxy.close)
    proxied = url.replace("127.0.0.1:5432", proxy.address)
    broker = broker_url
    client = Client(broker_url=broker, database_url=url)  # the producer's own path
    start_worker("text", service_env(broker, proxied, **FAST), concurrency=8)
    ids = client.submit_many([{"modality": "text", "input": s}
                              for s in sentences(300, seed=5, median_words=40)])
    client.wait(ids[:3], timeout=180, with_embedding=False)
    proxy.down()
    time.sleep(12)
    proxy.up()
    res = client.wait(ids, timeout=300, with_embedding=False)
    _assert_all_once(client, ids, res)
