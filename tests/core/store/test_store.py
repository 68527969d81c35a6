"""The results store on SQLite and PostgreSQL: migrations, job lifecycle, idempotency."""

import hashlib
import threading
import uuid
from datetime import timedelta

import numpy as np
from sqlalchemy import func, inspect, select, update

from core import store
from core.jobs import JobResult, JobStatus
from core.store.migrations import upgrade


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
    # A redelivered job runs twice (its first worker stalled past its lease): the
    # attempt that holds the job records its outcome; the first one's is dropped.
    for attempt in (1, 2):
        with sessions.begin() as s:
            started = store.start_jobs(session=s, job_ids=[job.id],
                                       worker=f"w{attempt}").get(job.id)
            assert started is not None and started.attempts == attempt
    for attempt in (2, 1):
        with sessions.begin() as s:
            assert (job.id in store.finish_jobs(
                session=s, model_version="v1", attempts={job.id: attempt},
                results={job.id: JobResult(embedding=emb * attempt, labels=[("a", 0.9)],
                                           tokens=17, truncated=False)})) == (attempt == 2)
    with sessions() as s:
        n = s.scalar(select(func.count()).select_from(store.Prediction))
        p = store.get_prediction(session=s, job_id=job.id)
        j = store.get_job(session=s, job_id=job.id)
    assert n == 1 and j.attempts == 2 and j.worker == "w2"
    assert np.array_equal(p.vector(), emb * 2) and p.dim == 4 and p.labels == [["a", 0.9]]


def test_terminal_jobs_do_not_start_again(sessions):
    with sessions.begin() as s:
        a = store.create_job(session=s, modality="text", task="embed", text="a").id
        b = store.create_job(session=s, modality="text", task="embed", text="b").id
    with sessions.begin() as s:
        assert store.cancel_job(session=s, job_id=a)
        store.start_jobs(session=s, job_ids=[b], worker="w")
        assert store.fail_job(session=s, job_id=b, error="boom", attempt=1)
    with sessions.begin() as s:
        assert store.start_jobs(session=s, job_ids=[a], worker="w") == {}
        assert store.start_jobs(session=s, job_ids=[b], worker="w") == {}
        assert not store.cancel_job(session=s, job_id=b)  # terminal jobs stay as they are
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


# -- the bulk functions the workers' group-commit writer runs (core/serving/writer.py) ----------
# Every worker write goes through these.

def _job_row(sessions, job_id):
    with sessions() as s:
        return store.get_job(session=s, job_id=job_id)


def _text_jobs(sessions, n):
    with sessions.begin() as s:
        return [store.create_job(session=s, modality="text", task="embed", text=f"t{i}").id
                for i in range(n)]


def test_finish_jobs_twice_keeps_one_prediction_with_the_last_outcome(sessions):
    """Two runs of one job (its worker was taken for dead, the job put back and run
    again): the run that holds the job stores its outcome over the first one's row,
    in one statement with other jobs' outcomes."""
    a, b, c = _text_jobs(sessions, 3)
    with sessions.begin() as s:
        assert set(store.start_jobs(session=s, job_ids=[a, b], worker="w1")) == {a, b}
        assert store.finish_jobs(session=s, model_version="v1", attempts={a: 1, b: 1},
                                 results={
            a: JobResult(embedding=np.ones(4, np.float32), labels=[("x", 0.1)], tokens=3,
                         truncated=False),
            b: JobResult(embedding=np.zeros(4, np.float32), tokens=2)}) == {a, b}
    with sessions.begin() as s:  # as if the sweep had put a back (its ack was lost)
        s.execute(update(store.Job).where(store.Job.id == a).values(status="queued"))
    with sessions.begin() as s:  # the second run: a new job (c) shares the statement
        started = store.start_jobs(session=s, job_ids=[a, c], worker="w2")
        assert (started[a].attempts, started[c].attempts) == (2, 1)
        store.finish_jobs(session=s, model_version="v2", attempts={a: 2, c: 1}, results={
            a: JobResult(embedding=np.arange(8, dtype=np.float32), labels=[("y", 0.9)],
                         tokens=9, truncated=True),
            c: JobResult(labels=[("z", 0.5)], tokens=1)})
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(store.Prediction)) == 3
        pa = store.get_prediction(session=s, job_id=a)
        pb = store.get_prediction(session=s, job_id=b)
        pc = store.get_prediction(session=s, job_id=c)
    assert np.array_equal(pa.vector(), np.arange(8, dtype=np.float32)) and pa.dim == 8
    assert (pa.labels, pa.tokens, pa.truncated, pa.model_version) == (
        [["y", 0.9]], 9, True, "v2")
    assert np.array_equal(pb.vector(), np.zeros(4)) and pb.model_version == "v1"
    assert pc.vector() is None and pc.dim is None and pc.labels == [["z", 0.5]]
    ja = _job_row(sessions, a)
    assert ja.status == JobStatus.SUCCEEDED and ja.model_version == "v2"
    assert ja.finished_at is not None and ja.error is None


def test_an_absent_label_list_or_segment_list_is_stored_as_sql_null(sessions):
    """An embed job has no labels and no segments: its row holds SQL NULL there, not
    the JSON text ``null`` (which cost a json.dumps per column per row in every
    worker's record of a batch, and which ``IS NULL`` does not find)."""
    (a,) = _text_jobs(sessions, 1)
    with sessions.begin() as s:
        attempt = store.start_jobs(session=s, job_ids=[a], worker="w")[a].attempts
        store.finish_jobs(session=s, model_version="v", attempts={a: attempt},
                          results={a: JobResult(embedding=np.ones(3, np.float32))})
    table = store.Prediction.__table__
    with sessions() as s:
        row = s.execute(select(table.c.labels.is_(None), table.c.segments.is_(None))
                        .where(table.c.job_id == a)).one()
        p = store.get_prediction(session=s, job_id=a)
    assert tuple(row) == (True, True)
    assert p.labels is None and p.segments is None


def test_finish_jobs_replaces_an_embedding_with_none(sessions):
    """The last outcome wins field by field, nulls included (an embed re-run as a
    classify must not keep the old vector)."""
    (a,) = _text_jobs(sessions, 1)
    for result in (JobResult(embedding=np.ones(3, np.float32)), JobResult(labels=[("k", 1.0)])):
        with sessions.begin() as s:
            attempt = store.start_jobs(session=s, job_ids=[a], worker="w")[a].attempts
            store.finish_jobs(session=s, model_version="v", results={a: result},
                              attempts={a: attempt})
        with sessions.begin() as s:  # as if the first run's ack was lost mid-way
            s.execute(update(store.Job).where(store.Job.id == a)
                      .values(status="queued"))
    with sessions() as s:
        p = store.get_prediction(session=s, job_id=a)
    assert p.embedding is None and p.dim is None and p.labels == [["k", 1.0]]


def test_start_jobs_starts_queued_and_running_jobs_only(sessions):
    queued, running, done, failed, cancelled = _text_jobs(sessions, 5)
    with sessions.begin() as s:
        store.start_jobs(session=s, job_ids=[running, done, failed], worker="w0")
        store.finish_jobs(session=s, model_version="v", results={done: JobResult(tokens=1)},
                          attempts={done: 1})
        store.fail_job(session=s, job_id=failed, error="boom", attempt=1)
        assert store.cancel_job(session=s, job_id=cancelled)
    with sessions.begin() as s:
        started = store.start_jobs(
            session=s, job_ids=[queued, running, done, failed, cancelled, "no-such-job"],
            worker="w1")
    # queued: a first delivery; running: a redelivery after its worker died.
    assert set(started) == {queued, running}
    row = started[queued]
    assert (row.modality, row.task, row.text, row.payload_sha256) == ("text", "embed", "t0",
                                                                      None)
    j = {i: _job_row(sessions, i) for i in (queued, running, done, failed, cancelled)}
    assert (j[queued].status, j[queued].attempts, j[queued].worker) == ("running", 1, "w1")
    assert (j[running].status, j[running].attempts, j[running].worker) == ("running", 2, "w1")
    # Terminal jobs keep their state, attempts and worker: never run again.
    assert (j[done].status, j[done].attempts, j[done].worker) == ("succeeded", 1, "w0")
    assert (j[failed].status, j[failed].error, j[failed].attempts) == ("failed", "boom", 1)
    assert (j[cancelled].status, j[cancelled].attempts) == ("cancelled", 0)
    with sessions.begin() as s:
        assert store.start_jobs(session=s, job_ids=[done, cancelled], worker="w2") == {}
        store.finish_jobs(session=s, model_version="v", results={}, attempts={})  # a no-op


def test_a_late_failure_does_not_undo_a_success(sessions):
    """One run succeeded, the other then fails (the failure signal handler's write):
    the job stays succeeded with its prediction."""
    (a,) = _text_jobs(sessions, 1)
    with sessions.begin() as s:
        store.start_jobs(session=s, job_ids=[a], worker="w")
        store.finish_jobs(session=s, model_version="v", results={a: JobResult(tokens=4)},
                          attempts={a: 1})
        assert not store.fail_job(session=s, job_id=a, error="internal error: late", attempt=1)
    j = _job_row(sessions, a)
    assert j.status == "succeeded" and j.error is None


def test_a_vanished_clients_transaction_does_not_hold_its_jobs(monkeypatch):
    """PostgreSQL: a worker whose host's link is cut mid-transaction leaves a session
    idle in its transaction, holding row locks, until TCP gives up (minutes). The sweep's
    UPDATE of those jobs waited for it. The server now ends such sessions: another
    writer gets the rows after ``PG_IDLE_IN_TRANSACTION_S`` (1 s here)."""
    from sqlalchemy import text

    from core.store import tables
    from tests.helpers import pg_database as _pg_database
    from tests.helpers import pg_drop as _pg_drop

    name = f"mmq_idle_{uuid.uuid4().hex[:10]}"
    url = _pg_database(name)
    try:
        upgrade(url)  # under the normal limit: on a loaded machine the migrations'
        # client can sit over 1 s between two statements of their transaction
        monkeypatch.setattr(tables, "PG_IDLE_IN_TRANSACTION_S", 1)
        vanished, sweeper = store.make_engine(url), store.make_engine(url)
        with store.session_factory(sweeper).begin() as s:
            job = store.create_job(session=s, modality="text", task="embed", text="x").id
        held = vanished.connect()
        held.begin()
        held.execute(update(store.Job).where(store.Job.id == job).values(status="running"))
        # ... and nothing more from that client: no commit, no disconnect.
        with sweeper.connect() as c, c.begin():
            c.execute(text("SET LOCAL statement_timeout = '20s'"))  # a bound, not a timing
            moved = c.execute(update(store.Job).where(store.Job.id == job)
                              .values(status="cancelled")).rowcount
        assert moved == 1
        with store.session_factory(sweeper)() as s:
            assert store.get_job(session=s, job_id=job).status == "cancelled"
        held.invalidate()
        vanished.dispose()
        sweeper.dispose()
    finally:
        _pg_drop(name)


def test_a_transcripts_segments_are_stored_and_read_with_its_prediction(sessions):
    """Segments (start s, end s, text) round-trip as JSON on both databases, beside
    the transcript; predictions without any read None."""
    a, b = _text_jobs(sessions, 2)
    segs = [(0.0, 2.0, " The weather will be rainy."), (4.24, 8.2, " Tomorrow, é.")]
    with sessions.begin() as s:
        att = store.start_jobs(session=s, job_ids=[a, b], worker="w")
        store.finish_jobs(session=s, model_version="v", attempts={j: r.attempts
                                                                    for j, r in att.items()},
                          results={a: JobResult(text="".join(t for *_, t in segs).strip(),
                                                segments=segs),
                                   b: JobResult(tokens=3)})
    with sessions() as s:
        got = store.predictions_by_id(session=s, job_ids=[a, b, str(uuid.uuid4())])
    assert set(got) == {a, b}
    assert got[a].segments == [[0.0, 2.0, " The weather will be rainy."],
                               [4.24, 8.2, " Tomorrow, é."]]
    assert got[a].as_dict()["segments"] == got[a].segments and got[b].segments is None


def test_the_same_bytes_put_by_two_transactions_at_once_are_stored_once(sessions):
    """Both see no blob; the one that commits second must not fail (the same file
    posted twice at once was a 500 IntegrityError)."""
    data = b"RIFF same audio twice"
    first_put, release = threading.Event(), threading.Event()
    errors = []

    def first():
        try:
            with sessions.begin() as s:
                store.put_blob(session=s, data=data)
                first_put.set()
                release.wait(10)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)
            first_put.set()

    t = threading.Thread(target=first)
    t.start()
    assert first_put.wait(10)
    with sessions.begin() as s:
        assert s.get(store.Blob, hashlib.sha256(data).hexdigest()) is None
        threading.Timer(0.3, release.set).start()  # the first commits while we insert
        digest = store.put_blob(session=s, data=data)
    t.join(10)
    assert not errors
    with sessions() as s:
        assert store.get_blob(session=s, sha256=digest) == data
        assert s.scalar(select(func.count()).select_from(store.Blob)) == 1


def test_create_jobs_writes_the_rows_create_job_writes(sessions):
    """The producer's bulk insert (one INSERT, no ORM objects) and the one-job path make
    the same rows: deadline from timeout_s on the database's clock, payload stored once
    by its sha256, params, owner, webhook fields."""
    audio = b"RIFF-not-really-audio"
    args = [dict(modality="text", task="classify", text="a cat",
                 params={"labels": ["cat", "dog"], "top_k": 1}, timeout_s=30.0,
                 model_version="base", webhook_url="https://example.com/h",
                 webhook_embedding=True),
            dict(modality="audio", task="embed", payload=audio),
            dict(modality="text", task="embed", text="no options")]
    with sessions.begin() as s:
        now = store.db_time(session=s)
        one = [store.create_job(session=s, owner="k1", now=now, **a).id for a in args]
        many = store.create_jobs(session=s, rows=args, owner="k1", now=now)
    assert [m for _, m in many] == ["text", "audio", "text"]
    columns = ("modality", "task", "params", "status", "text", "payload_sha256", "deadline",
               "attempts", "created_at", "owner", "model_version", "webhook_url",
               "webhook_embedding", "worker", "sent_at", "started_at", "finished_at")
    with sessions() as s:
        for a, (b, _) in zip(one, many, strict=True):
            ja, jb = store.get_job(session=s, job_id=a), store.get_job(session=s, job_id=b)
            assert {c: getattr(jb, c) for c in columns} == {c: getattr(ja, c) for c in columns}
        assert store.get_blob(session=s, sha256=hashlib.sha256(audio).hexdigest()) == audio
        assert s.scalar(select(func.count()).select_from(store.Blob)) == 1
        first = store.get_job(session=s, job_id=many[0][0])
        # SQLite hands back naive UTC, PostgreSQL aware: compare the instants as UTC.
        assert first.deadline.replace(tzinfo=None) == (now + timedelta(seconds=30)
                                                        ).replace(tzinfo=None)
    with sessions.begin() as s:
        assert store.create_jobs(session=s, rows=[]) == []
