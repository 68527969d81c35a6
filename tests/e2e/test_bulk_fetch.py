"""Bulk fetch and grouped acknowledgements (workers/poison.py, workers/acks.py) with a real
redis-server and a real worker, on SQLite and PostgreSQL (the ``database_url`` params).

A backlog queued before the worker starts is fetched in bulk (a BRPOP, then one RPOP
for as many as the prefetch limit has room for) and acknowledged in groups. Every job
still runs once, and once the worker has stopped nothing is left behind in Redis: no
message in the queue, no unacknowledged copy, no fetched-by entry (an ack written
late, or an unacked entry written after its ack, would leave one)."""

from __future__ import annotations

import redis
from sqlalchemy import func, select

from core import store
from core.broker.queues import FETCHED_BY, FILLER, queued_job_ids, unacked_job_ids
from core.config import Settings
from core.training.samples import sentences
from producer.sdk import Client
from tests.helpers import service_env


def test_a_backlog_fetched_in_bulk_runs_once_and_leaves_nothing_unacked(
        new_broker, database_url, start_worker):
    broker = new_broker()
    # 15 to a message (60 split evenly at 16), so that a fetch takes several messages.
    client = Client(settings=Settings(broker_url=broker, database_url=database_url,
                                      jobs_per_message=16))
    ids = client.submit_many([{"modality": "text", "input": s}
                              for s in sentences(60, seed=23)])
    r = redis.Redis.from_url(broker)
    # All waiting before the worker's first fetch, four messages; the
    # list's length counts jobs (each message is followed by a filler per extra job).
    raws = r.lrange("text", 0, -1)
    assert sorted(j for raw in raws for j in queued_job_ids(raw)) == sorted(ids)
    assert len(raws) == len(ids) and sum(raw != FILLER for raw in raws) == 4
    worker = start_worker("text", service_env(broker, database_url), concurrency=8)
    res = client.wait(ids, timeout=180, with_embedding=False)
    assert [j["status"] for j in res] == ["succeeded"] * len(ids)
    assert [j["attempts"] for j in res] == [1] * len(ids)
    with client.sessions() as s:
        assert s.scalar(select(func.count()).select_from(store.Prediction)
                        .where(store.Prediction.job_id.in_(ids))) == len(ids)
    worker.stop()  # a warm stop: pending acks are written before the channel closes
    assert worker.proc.returncode == 0
    assert (r.llen("text"), r.hlen("unacked"), r.zcard("unacked_index"),
            r.hlen(FETCHED_BY)) == (0, 0, 0, 0)
    client.close()


def test_a_worker_counts_its_prefetch_in_jobs_not_messages(new_broker, start_worker,
                                                            tmp_path):
    """Eight jobs to a message, a worker with 8 task threads (prefetch 8): it holds one
    message at a time, at most 8 jobs plus one message's worth fetched while a slot was
    free, never 8 messages (64 jobs) that a second worker would then wait behind."""
    import time

    broker = new_broker()
    db = f"sqlite:///{tmp_path / 'mmq.db'}"
    client = Client(settings=Settings(broker_url=broker, database_url=db, jobs_per_message=8))
    ids = client.submit_many([{"modality": "text", "input": s}
                              for s in sentences(96, seed=24)])
    r = redis.Redis.from_url(broker)
    worker = start_worker("text", service_env(broker, db), concurrency=8)
    held, end = [], time.monotonic() + 180
    while time.monotonic() < end:
        held.append(sum(len(unacked_job_ids(v)) for v in r.hvals("unacked")))
        with client.sessions() as s:
            if not s.scalar(select(func.count()).select_from(store.Job).where(
                    store.Job.status.in_(["queued", "running"]))):
                break
    assert max(held) > 0, "never saw a fetched message"
    assert max(held) <= 8 + 7, f"held {max(held)} jobs with a prefetch of 8"
    res = client.wait(ids, timeout=180, with_embedding=False)
    assert [j["status"] for j in res] == ["succeeded"] * len(ids)
    worker.stop()
    client.close()


def test_a_batch_heavier_than_the_prefetch_is_fetched_with_its_fillers(new_broker,
                                                                       start_worker,
                                                                       tmp_path):
    """A message of 16 jobs, a worker whose prefetch is 8: it takes the message (one
    message's worth past its room) and must take the message's 15 fillers with it. Left
    in the list, they counted as 15 queued jobs for as long as the batch ran, and were
    still there when a test stopped the worker after every job had finished."""
    broker = new_broker()
    db = f"sqlite:///{tmp_path / 'mmq.db'}"
    client = Client(settings=Settings(broker_url=broker, database_url=db,
                                      jobs_per_message=16))
    ids = client.submit_many([{"modality": "text", "input": s}
                              for s in sentences(16, seed=25)])
    r = redis.Redis.from_url(broker)
    assert r.llen("text") == 16
    start_worker("text", service_env(broker, db), concurrency=8, wait=False)
    while not r.hlen("unacked"):  # the message fetched: its entry is written after the pop
        with client.sessions() as s:
            assert s.scalar(select(func.count()).select_from(store.Job).where(
                store.Job.status == "succeeded")) == 0, "finished before it was seen held"
    assert r.llen("text") == 0
    res = client.wait(ids, timeout=180, with_embedding=False)
    assert [j["status"] for j in res] == ["succeeded"] * len(ids)
    client.close()
