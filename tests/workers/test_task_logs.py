"""A task that ends on a database error: Celery logs the task's failure itself
(celery.app.trace: ERROR with the traceback, WARNING with it for a rejected message)
and sends the error in the task-failed event that Flower shows. SQLAlchemy's message
carries the statement and its parameters (a prediction's labels, a transcript: a
user's data), so what leaves the task is the failure recorded on the job (the error's
class and the driver's first line), and where it happened is logged without the SQL.
Run through Celery's own tracer (``apply``), not by calling the task function."""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from core.config import Settings
from core.serving.host import JobFuture
from workers import tasks

SECRET = "my-secret-voice-memo"  # a transcript: a user's data
STATEMENT = "INSERT INTO predictions (job_id, text) VALUES (?, ?)"


def _failed(error: BaseException) -> JobFuture:
    fut = JobFuture()
    fut.attempt = 2
    fut.set_exception(error)
    return fut


def _integrity_error() -> IntegrityError:
    try:  # raised, so that it has a traceback, as the writer's has
        raise IntegrityError(STATEMENT, ("job-1", SECRET),
                             sqlite3.IntegrityError("CHECK constraint failed: text"))
    except IntegrityError as e:
        return e


@pytest.fixture
def host(monkeypatch):
    """A runtime whose job ends on a database error (a bug, not an outage: no retry)."""
    state = SimpleNamespace(recorded=[], abandoned=[], record_error=None)

    def record_failure(job_id, error, attempt):
        if state.record_error is not None:
            raise state.record_error
        state.recorded.append((job_id, error, attempt))

    monkeypatch.setattr(tasks.app, "_runtime", SimpleNamespace(
        host=SimpleNamespace(settings=Settings(),
                             process=lambda job_id, worker: _failed(_integrity_error()),
                             process_many=lambda job_ids, worker: {
                                 j: _failed(_integrity_error()) for j in job_ids},
                             record_failure=record_failure),
        lease=SimpleNamespace(abandon=state.abandoned.append)))
    return state


def _logged(caplog) -> str:
    return "\n".join(caplog.handler.format(r) for r in caplog.records)


def test_a_job_failed_by_a_database_error_leaves_the_task_without_its_statement(host,
                                                                                caplog):
    with caplog.at_level("DEBUG"):
        result = tasks.run_job.apply(args=("job-1",))
    assert result.state == "FAILURE"
    assert host.recorded == [("job-1", "internal error: IntegrityError: CHECK constraint "
                              "failed: text", 2)]
    text = _logged(caplog)
    assert SECRET not in text and "[SQL:" not in text, text
    # Still said: which job, what error, and where (the frames, without values).
    assert "job-1" in text and "IntegrityError: CHECK constraint failed: text" in text
    assert "in _integrity_error" in text, text
    # What Celery keeps and sends in its task-failed event (Flower shows both).
    assert SECRET not in repr(result.result) and SECRET not in (result.traceback or "")


def test_a_message_rejected_for_an_unrecorded_failure_carries_no_statement(host, caplog):
    """The failure itself could not be written: the message goes back onto the queue
    (Reject), which Celery logs with its traceback, the database errors chained."""
    host.record_error = OperationalError("UPDATE jobs SET error=? WHERE id=?",
                                         (SECRET, "job-1"),
                                         sqlite3.OperationalError("database is locked"))
    with caplog.at_level("DEBUG"):
        tasks.run_job.apply(args=("job-1",))
    assert host.abandoned == ["job-1"]
    text = _logged(caplog)
    assert SECRET not in text and "[SQL:" not in text, text
    assert "OperationalError: database is locked" in text, text


def test_a_batch_messages_failed_job_is_logged_as_a_single_jobs_is(host, caplog):
    """run_jobs recorded such a failure without logging it: a job of a batch message
    failed by a bug left nothing in the worker's log, where run_job's says which job,
    what error and where. The same line now, without the statement."""
    with caplog.at_level("DEBUG"):
        result = tasks.run_jobs.apply(args=(["job-1", "job-2"],))
    assert result.result == {"jobs": 2, "failed": 2}
    assert [j for j, _, _ in host.recorded] == ["job-1", "job-2"]
    errors = [r for r in caplog.records if r.levelname == "ERROR" and r.name == tasks.log.name]
    assert [r.getMessage().splitlines()[0] for r in errors] == [
        f"job {j}: internal error: IntegrityError: CHECK constraint failed: text"
        for j in ("job-1", "job-2")], _logged(caplog)
    text = _logged(caplog)
    assert SECRET not in text and "[SQL:" not in text, text
    assert "in _integrity_error" in text, text
