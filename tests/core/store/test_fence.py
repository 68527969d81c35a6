"""Fenced outcomes and one clock, on SQLite and PostgreSQL.

Delivery is at least once and an attempt can outlive its hold on a job (its worker
stalled past its lease, the sweep handed the job to another attempt, its owner
cancelled it). Each start returns a fencing token, the attempt number; only the
attempt that holds a ``running`` job records its outcome, and ``cancelled`` and
``failed`` never turn into ``succeeded``. Times that decide anything come from the
database's clock, never from the caller's.
"""

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import func, select, update

from core import store
from core.jobs import JobResult, JobStatus


def _jobs(sessions, n, **kw):
    with sessions.begin() as s:
        return [store.create_job(session=s, modality="text", task="embed", text=f"t{i}",
                                 **kw).id for i in range(n)]


def _row(sessions, job_id):
    with sessions() as s:
        return store.get_job(session=s, job_id=job_id)


def _predictions(sessions, job_id) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(store.Prediction)
                        .where(store.Prediction.job_id == job_id))


def _start(sessions, job_id, worker="w") -> int:
    with sessions.begin() as s:
        return store.start_jobs(session=s, job_ids=[job_id], worker=worker)[job_id].attempts


def _finish(sessions, job_id, attempt) -> bool:
    with sessions.begin() as s:
        return job_id in store.finish_jobs(
            session=s, model_version="v", attempts={job_id: attempt},
            results={job_id: JobResult(embedding=np.ones(4, np.float32))})


def test_a_cancelled_job_never_turns_succeeded(sessions):
    """The issue's case: the job's worker stalls past its lease, the sweep hands the
    job back to ``queued``, its owner cancels it, and the worker resumes and finishes."""
    (a,) = _jobs(sessions, 1)
    attempt = _start(sessions, a, worker="stalled")
    with sessions.begin() as s:
        assert store.requeue_orphans(session=s, jobs=[(a, "stalled")]) == [a]
        assert store.cancel_job(session=s, job_id=a)
    assert not _finish(sessions, a, attempt)  # the late result is dropped
    j = _row(sessions, a)
    assert (j.status, j.error) == ("cancelled", "cancelled before it ran")
    assert _predictions(sessions, a) == 0


def test_cancel_of_a_running_job_holds_against_its_result_and_its_failure(sessions):
    a, b = _jobs(sessions, 2)
    ta, tb = _start(sessions, a), _start(sessions, b)
    with sessions.begin() as s:
        assert store.cancel_job(session=s, job_id=a)
        assert store.cancel_job(session=s, job_id=b)
        assert not store.cancel_job(session=s, job_id=a)  # already terminal
        assert sorted(store.cancelled_among(session=s, job_ids=[a, b, "other"])) == sorted([a, b])
    assert not _finish(sessions, a, ta)
    with sessions.begin() as s:  # and not by the deadline path either
        assert not store.fail_job(session=s, job_id=b, error="deadline passed", attempt=tb,
                                  status=JobStatus.CANCELLED)
    for job_id in (a, b):
        j = _row(sessions, job_id)
        assert (j.status, j.error) == ("cancelled", "cancelled while running")
        assert _predictions(sessions, job_id) == 0
    with sessions.begin() as s:  # a redelivered message does not start it again
        assert store.start_jobs(session=s, job_ids=[a, b], worker="w2") == {}


def test_only_the_attempt_that_holds_the_job_records_an_outcome(sessions):
    a, b = _jobs(sessions, 2)
    first = _start(sessions, a, "w1")
    second = _start(sessions, a, "w2")  # redelivered while the first still runs
    assert (first, second) == (1, 2)
    with sessions.begin() as s:  # the earlier attempt's failure does not end the job
        assert not store.fail_job(session=s, job_id=a, error="late failure", attempt=first)
    assert _row(sessions, a).status == "running"
    assert _finish(sessions, a, second)
    assert not _finish(sessions, a, first)  # nor does its result replace the holder's
    with sessions.begin() as s:  # a failed job stays failed
        tb = store.start_jobs(session=s, job_ids=[b], worker="w1")[b].attempts
        assert store.fail_job(session=s, job_id=b, error="bad input", attempt=tb)
    assert not _finish(sessions, b, tb)
    assert (_row(sessions, b).status, _predictions(sessions, b)) == ("failed", 0)
    with sessions() as s:
        p = store.get_prediction(session=s, job_id=a)
    assert p is not None and _row(sessions, a).attempts == 2


def test_a_batch_of_outcomes_records_the_holders_and_drops_the_late(sessions):
    a, b, c = _jobs(sessions, 3)
    for j in (a, b, c):
        _start(sessions, j)
    _start(sessions, b, "w2")  # b: now held by attempt 2
    with sessions.begin() as s:
        store.cancel_job(session=s, job_id=c)
        done = store.finish_jobs(session=s, model_version="v", attempts={a: 1, b: 1, c: 1},
                                 results={j: JobResult(tokens=1) for j in (a, b, c)})
    assert done == {a}
    assert [_predictions(sessions, j) for j in (a, b, c)] == [1, 0, 0]


def test_a_job_that_never_started_fails_only_while_queued(sessions):
    a, b = _jobs(sessions, 2)
    _start(sessions, b)
    with sessions.begin() as s:
        assert store.fail_job(session=s, job_id=a, error="could not start", attempt=None)
        assert not store.fail_job(session=s, job_id=b, error="could not start", attempt=None)
    assert _row(sessions, a).status == "failed" and _row(sessions, b).status == "running"


def test_stamps_and_deadlines_come_from_the_database_clock(sessions, monkeypatch):
    """A producer whose clock is 10 minutes fast: its timeout becomes a deadline from
    the database's clock, and the start reports the database's time with it."""
    import core.store.tables as tables

    fast = datetime.now(UTC) + timedelta(minutes=10)
    monkeypatch.setattr(tables, "utcnow", lambda: fast)
    monkeypatch.setattr(store, "utcnow", lambda: fast)
    (a,) = _jobs(sessions, 1, timeout_s=300)
    with sessions.begin() as s:
        row = store.start_jobs(session=s, job_ids=[a], worker="w")[a]
        db_now = store.db_time(session=s)
    aware = lambda d: d if d.tzinfo else d.replace(tzinfo=UTC)  # noqa: E731
    left = (aware(row.deadline) - aware(row.now)).total_seconds()
    assert 290 < left <= 300
    j = _row(sessions, a)
    for stamp in (j.created_at, j.started_at):
        assert abs((aware(stamp) - db_now).total_seconds()) < 60


def test_leases_are_judged_by_the_database_clock(sessions):
    """A lease renewed now is live whatever the worker's clock says; one not renewed
    for longer than the lease is not."""
    with sessions.begin() as s:
        store.renew_lease(session=s, worker="w-now", modality="text")
        store.renew_lease(session=s, worker="w-old", modality="image")
        s.execute(update(store.WorkerLease).where(store.WorkerLease.worker == "w-old")
                  .values(heartbeat_at=store.db_now(-60)))
    with sessions() as s:
        assert store.live_workers(session=s, lease=timedelta(seconds=20)) == ["w-now"]
        assert store.live_workers(session=s, lease=timedelta(seconds=20),
                                  modality="image") == []


@pytest.mark.parametrize("offset", [-3600.5, 0.0, 42.25])
def test_db_now_offsets(sessions, offset):
    with sessions() as s:
        now = store.db_time(session=s)
        shifted = s.scalar(select(store.db_now(offset)))
    shifted = shifted if shifted.tzinfo else shifted.replace(tzinfo=UTC)
    assert abs((shifted - now).total_seconds() - offset) < 5


def test_a_late_start_does_not_take_a_job_from_a_live_worker(sessions):
    """A host whose link comes back after the sweep handed its jobs on, or a message
    redelivered while its job still runs, must not start the job again: that took it
    from the attempt that held it (bench/cluster.py's link cut recovered only when the
    cut host returned, 61 s). A job whose worker's lease is dead is taken at once."""
    a, b = _jobs(sessions, 2)
    with sessions.begin() as s:
        store.renew_lease(session=s, worker="live", modality="text")
    assert _start(sessions, a, "live") == 1
    assert _start(sessions, b, "gone") == 1  # "gone" holds no lease
    with sessions.begin() as s:
        assert store.start_jobs(session=s, job_ids=[a], worker="late") == {}
        assert store.start_jobs(session=s, job_ids=[b], worker="late")[b].attempts == 2
        # The holder's own retry (its task trying again) starts it again.
        assert store.start_jobs(session=s, job_ids=[a], worker="live")[a].attempts == 2
    j = _row(sessions, a)
    assert (j.status, j.worker, j.attempts) == ("running", "live", 2)
    assert _row(sessions, b).worker == "late"


def test_a_group_of_ten_thousand_finishes_in_one_call(sessions):
    """PostgreSQL nests a row-value IN list one level per pair and refused ~9,000
    fences in one UPDATE ("stack depth limit exceeded"): a worker with a large batch
    or concurrency failed its whole group commit. Split into statements, all recorded."""
    ids = [r[0] for r in _create_many(sessions, 10_000)]
    with sessions.begin() as s:
        started = store.start_jobs(session=s, job_ids=ids, worker="w")
    with sessions.begin() as s:
        done = store.finish_jobs(
            session=s, model_version="v", attempts={j: started[j].attempts for j in ids},
            results={j: JobResult(embedding=np.ones(4, np.float32)) for j in ids})
    assert done == set(ids)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(store.Prediction)) == 10_000
        assert set(store.job_statuses(session=s, job_ids=ids).values()) == {"succeeded"}


def _create_many(sessions, n):
    with sessions.begin() as s:
        return store.create_jobs(session=s, rows=[
            {"modality": "text", "task": "embed", "text": f"t{i}"} for i in range(n)])
