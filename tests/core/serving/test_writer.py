"""The group-commit writer without a model or Celery: typed operations against real
SQLite, the fence on outcomes, and many task threads' writes in one transaction."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest

from core import store
from core.jobs import JobResult, JobStatus
from core.serving.writer import GroupWriter, NotStarted, Started
from core.store.migrations import upgrade


class CountingSessions:
    """A sessionmaker that counts the transactions begun through it."""

    def __init__(self, sessions):
        self.sessions, self.begun = sessions, 0

    def __call__(self):
        return self.sessions()

    @contextmanager
    def begin(self):
        self.begun += 1
        with self.sessions.begin() as s:
            yield s


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'mmq.db'}"
    upgrade(url)
    return CountingSessions(store.session_factory(store.make_engine(url)))


@pytest.fixture
def writer(sessions):
    return GroupWriter(sessions)


def _job(sessions, **kw) -> str:
    with sessions.begin() as s:
        return store.create_job(session=s, **kw).id


def _get(sessions, job_id: str):
    with sessions() as s:
        return store.get_job(session=s, job_id=job_id), store.get_prediction(session=s,
                                                                              job_id=job_id)


def test_a_start_answers_the_row_its_input_and_its_fencing_token(sessions, writer):
    text_id = _job(sessions, modality="text", task="embed", text="hello")
    image_id = _job(sessions, modality="image", task="embed", payload=b"\x89PNG bytes")
    text = writer.start(text_id, "w1").result(timeout=30)
    image = writer.start(image_id, "w1").result(timeout=30)
    assert isinstance(text, Started) and isinstance(image, Started)
    assert (text.payload, text.attempt, text.job.id, text.version) == ("hello", 1, text_id, None)
    assert image.payload == b"\x89PNG bytes" and image.job.modality == "image"
    job, _ = _get(sessions, text_id)
    assert (job.status, job.worker, job.attempts) == ("running", "w1", 1)
    # Its task retrying on the same worker: a new start, a new token.
    assert writer.start(text_id, "w1").result(timeout=30).attempt == 2


def test_a_job_that_must_not_run_is_not_started_and_says_why(sessions, writer):
    done = _job(sessions, modality="text", task="embed", text="done")
    writer.start(done, "w1").result(timeout=30)
    assert writer.finish(done, 1, "v", JobResult(tokens=1)).result(timeout=30) is True
    cancelled = _job(sessions, modality="text", task="embed", text="cancelled")
    with sessions.begin() as s:
        assert store.cancel_job(session=s, job_id=cancelled)
    assert writer.start(done, "w2").result(timeout=30) == NotStarted("succeeded")
    assert writer.start(cancelled, "w2").result(timeout=30) == NotStarted("cancelled")
    assert writer.start("no-such-job", "w2").result(timeout=30) == NotStarted("unknown")
    assert _get(sessions, done)[0].attempts == 1  # not started again


def test_outcomes_are_fenced_by_the_attempt_that_holds_the_job(sessions, writer):
    job_id = _job(sessions, modality="text", task="embed", text="fenced")
    writer.start(job_id, "w1").result(timeout=30)
    writer.start(job_id, "w1").result(timeout=30)  # attempt 2 now holds it
    assert writer.finish(job_id, 1, "v-old", JobResult(tokens=1)).result(timeout=30) is False
    assert writer.fail(job_id, 1, "late failure").result(timeout=30) is False
    job, pred = _get(sessions, job_id)
    assert job.status == "running" and pred is None
    assert writer.finish(job_id, 2, "v-new", JobResult(tokens=2)).result(timeout=30) is True
    job, pred = _get(sessions, job_id)
    assert (job.status, pred.tokens, pred.model_version) == ("succeeded", 2, "v-new")


def test_a_failure_records_its_status_and_reason(sessions, writer):
    job_id = _job(sessions, modality="text", task="embed", text="too late")
    writer.start(job_id, "w1").result(timeout=30)
    assert writer.fail(job_id, 1, "deadline passed", JobStatus.CANCELLED).result(timeout=30)
    job, _ = _get(sessions, job_id)
    assert (job.status, job.error) == ("cancelled", "deadline passed")


def test_writes_queued_while_a_transaction_runs_commit_together(sessions, writer):
    """Group commit: whatever queued up during one transaction goes in the next, one
    transaction for all of them, every kind of op mixed."""
    ids = [_job(sessions, modality="text", task="embed", text=f"job {i}") for i in range(8)]
    gate, entered = threading.Event(), threading.Event()

    def hold(_session):
        entered.set()
        gate.wait(30)
        return "held"

    first = writer.call(hold)
    assert entered.wait(30)
    before = sessions.begun
    starts = [writer.start(j, "w1") for j in ids]
    other = writer.call(lambda s: store.db_time(session=s) is not None)
    gate.set()
    assert first.result(timeout=30) == "held"
    assert all(isinstance(f.result(timeout=30), Started) for f in starts)
    assert other.result(timeout=30) is True
    assert sessions.begun == before + 1  # the eight starts and the call: one transaction
    finishes = [writer.finish(j, 1, "v", JobResult(tokens=i)) for i, j in enumerate(ids)]
    assert all(f.result(timeout=30) for f in finishes)
    assert {_get(sessions, j)[0].status for j in ids} == {"succeeded"}


def test_a_failed_group_is_retried_one_write_at_a_time(sessions, writer):
    job_id = _job(sessions, modality="text", task="embed", text="grouped")
    gate, entered = threading.Event(), threading.Event()
    writer.call(lambda s: (entered.set(), gate.wait(30)))
    assert entered.wait(30)
    writer.start(job_id, "w1")

    def boom(_session):
        raise RuntimeError("a write that fails")

    bad = writer.call(boom)
    gate.set()
    with pytest.raises(RuntimeError, match="a write that fails"):
        bad.result(timeout=30)
    assert _get(sessions, job_id)[0].status == "running"  # its neighbour was written


def test_a_failed_group_logs_one_short_line_not_its_sql(sessions, writer, caplog):
    """A group's failure is logged once, briefly: SQLAlchemy's message carries the whole
    statement (with 1,000 fenced finishes per statement, tens of KB) and its traceback in
    one log record. Each write's own error still reaches its caller in full."""
    from sqlalchemy import text

    gate, entered = threading.Event(), threading.Event()
    writer.call(lambda s: (entered.set(), gate.wait(30)))
    assert entered.wait(30)
    names = [f"p{i}" for i in range(2000)]
    statement = text("SELECT " + ", ".join(f":{n}" for n in names) + " FROM no_such_table")

    def long_sql(session):
        session.execute(statement, {n: "x" * 20 for n in names})

    ok = writer.call(lambda s: "fine")
    bad = writer.call(long_sql)
    with caplog.at_level("DEBUG", logger="mmq"):
        gate.set()
        with pytest.raises(Exception, match="no_such_table") as err:
            bad.result(timeout=30)
        assert ok.result(timeout=30) == "fine"
    assert len(str(err.value)) > 5_000  # the caller's error: whole
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "no such table: no_such_table" in warned[0].getMessage()
    assert len(warned[0].getMessage()) < 500 and warned[0].exc_info is None
    # Nor the traceback at debug level: where, never the statement or its parameters
    # (a group's: other jobs' predictions and transcripts).
    logged = "\n".join(caplog.handler.format(r) for r in caplog.records)
    assert "Traceback (most recent call last)" in logged, logged[:3000]
    assert "FROM no_such_table" not in logged and "x" * 20 not in logged, logged[:3000]
