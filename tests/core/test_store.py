"""The results store on SQLite and PostgreSQL: migrations, job lifecycle, idempotency."""

import uuid
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import func, inspect, select

from core import store
from core.jobs import JobStatus
from core.migrations import upgrade
from tests.e2e.conftest import _pg_database, _pg_drop


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


def test_migration_creates_the_schema(sessions):
    with sessions() as s:
        tables = set(inspect(s.get_bind()).get_table_names())
    assert {"jobs", "blobs", "predictions", "alembic_version"} <= tables


def test_job_lifecycle_and_one_prediction_per_job(sessions):
    with sessions.begin() as s:
        job = store.create_job(session=s, modality="image", task="classify",
                               params={"labels": ["a", "b"], "top_k": 1}, payload=b"\x89PNG..")
    with sessions() as s:
        j = store.get_job(session=s, job_id=job.id)
        assert j.status == "queued" and j.attempts == 0 and len(j.payload_sha256) == 64
        assert store.get_blob(session=s, sha256=j.payload_sha256) == b"\x89PNG.."
    emb = np.arange(4, dtype=np.float32)
    for attempt in (1, 2):  # a redelivered job runs twice: still one prediction
        with sessions.begin() as s:
            assert store.start_job(session=s, job_id=job.id, worker=f"w{attempt}") is not None
            store.finish_job(session=s, job_id=job.id, model_version="v1", embedding=emb,
                             labels=[["a", 0.9]], tokens=17, truncated=False)
        with sessions.begin() as s:
            s.execute(store.update(store.Job).where(store.Job.id == job.id)
                      .values(status="running"))  # as if the ack was lost mid-way
    with sessions() as s:
        n = s.scalar(select(func.count()).select_from(store.Prediction))
        p = store.get_prediction(session=s, job_id=job.id)
        j = store.get_job(session=s, job_id=job.id)
    assert n == 1 and j.attempts == 2 and j.worker == "w2"
    assert np.array_equal(p.vector(), emb) and p.dim == 4 and p.labels == [["a", 0.9]]


def test_terminal_jobs_do_not_start_again(sessions):
    with sessions.begin() as s:
        a = store.create_job(session=s, modality="text", task="embed", text="a").id
        b = store.create_job(session=s, modality="text", task="embed", text="b").id
    with sessions.begin() as s:
        assert store.cancel_job(session=s, job_id=a)
        store.start_job(session=s, job_id=b, worker="w")
        store.fail_job(session=s, job_id=b, error="boom")
    with sessions.begin() as s:
        assert store.start_job(session=s, job_id=a, worker="w") is None
        assert store.start_job(session=s, job_id=b, worker="w") is None
        assert not store.cancel_job(session=s, job_id=b)  # only queued jobs cancel
    with sessions() as s:
        assert store.get_job(session=s, job_id=a).status == JobStatus.CANCELLED
        assert store.get_job(session=s, job_id=b).error == "boom"


def test_stale_queued_and_listing(sessions):
    with sessions.begin() as s:
        ids = [store.create_job(session=s, modality="text", task="embed", text=str(i)).id
               for i in range(3)]
    with sessions.begin() as s:
        store.mark_sent(session=s, job_ids=ids[:1])
    with sessions() as s:
        assert store.stale_queued(session=s, older_than=timedelta(hours=1)) == []
        stale = store.stale_queued(session=s, older_than=timedelta(seconds=-1))
        assert sorted(j.id for j in stale) == sorted(ids)
        assert len(store.list_jobs(session=s, status="queued", modality="text")) == 3
        assert store.list_jobs(session=s, modality="audio") == []
        assert store.count_by_status(session=s)[("text", "queued")] == 3


def test_blobs_are_content_addressed(sessions):
    with sessions.begin() as s:
        a = store.create_job(session=s, modality="audio", task="embed", payload=b"same")
        b = store.create_job(session=s, modality="audio", task="embed", payload=b"same")
    assert a.payload_sha256 == b.payload_sha256
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(store.Blob)) == 1
