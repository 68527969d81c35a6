"""The task's retries through a store or broker outage, on a simulated clock: how many,
how long, and that a minute's outage is ridden out (no worker, no real sleeping)."""

from types import SimpleNamespace

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import OperationalError

from core.config import Settings
from core.serving.host import JobFuture
from workers import tasks


def _future(*, result=None, error: BaseException | None = None,
            attempt: int | None = None) -> JobFuture:
    """What ``ModelHost.process`` returns: resolved, with the start's fencing token."""
    fut = JobFuture()
    fut.attempt = attempt
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
    return fut


@pytest.fixture
def outage(monkeypatch):
    """-> state of a broker outage that lasts ``state.outage_s`` simulated seconds;
    the task's sleeps advance the simulated clock instead of waiting. ``state.runs``
    may script each run instead: a list of futures, one per try."""
    state = SimpleNamespace(clock=0.0, slept=[], failures=[], outage_s=float("inf"),
                            runs=None, handed=[], alone=[])

    def process(job_id: str, worker: str) -> JobFuture:
        state.alone.append(job_id)
        return try_job(job_id)

    def process_many(job_ids: list[str], worker: str) -> dict[str, JobFuture]:
        state.handed.append(list(job_ids))
        return {j: try_job(j) for j in job_ids}

    def try_job(job_id: str) -> JobFuture:
        if state.runs is not None:
            return state.runs.pop(0)
        if state.clock < state.outage_s:
            return _future(error=RedisConnectionError(
                "Error 111 connecting to redis: Connection refused"))
        return _future(result={"id": job_id, "status": "succeeded"}, attempt=1)

    def sleep(s: float) -> None:
        state.slept.append(s)
        state.clock += s

    monkeypatch.setattr(tasks.app, "_runtime", SimpleNamespace(
        host=SimpleNamespace(settings=Settings(), process=process,
                             process_many=process_many)))
    monkeypatch.setattr(tasks, "time", SimpleNamespace(sleep=sleep))
    monkeypatch.setattr(tasks, "_record_failure", lambda job_id, error, attempt:
                        state.failures.append((error, attempt)))
    return state


def test_retries_are_ten_with_backoff_capped_at_30_s(outage):
    """The documented policy (core/config.py): 10 retries, 1+2+4+8+16+30*5 = 181 s,
    then the failure is recorded. Setting the count to 1 made no test fail."""
    # Raised as the failure it recorded (tests/workers/test_task_logs.py says why).
    with pytest.raises(tasks.JobFailed, match="gave up after 10 retries: ConnectionError"):
        tasks.run_job("job-1")
    assert outage.slept == [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]
    assert sum(outage.slept) == 181
    assert len(outage.failures) == 1 and outage.failures[0][0].startswith("gave up after 10 ")


def test_a_minute_long_outage_is_ridden_out(outage):
    outage.outage_s = 60.0
    assert tasks.run_job("job-1") == {"id": "job-1", "status": "succeeded"}
    assert outage.failures == [] and sum(outage.slept) >= 60


def test_the_failure_after_retries_is_fenced_by_the_start_that_holds_the_job(outage):
    """The first try started the job (attempt 3) and could not record its result; every
    later try failed before its start. The job is still ``running`` under attempt 3, so
    the failure must carry 3: with no token (``fail_job`` then wants a ``queued`` job)
    it was dropped, the message acknowledged, and the job left ``running`` under a live
    worker, where no sweep looks: stuck for the worker's life."""
    down = OperationalError("UPDATE jobs", {}, Exception("server closed the connection"))
    outage.runs = [_future(error=down, attempt=3)] + [_future(error=down)
                                                      for _ in range(10)]
    with pytest.raises(tasks.JobFailed):
        tasks.run_job("job-1")
    assert len(outage.failures) == 1
    error, attempt = outage.failures[0]
    assert error.startswith("gave up after 10 ") and attempt == 3


def test_a_batch_message_hands_its_jobs_to_the_host_together(outage, monkeypatch):
    """run_jobs (several jobs in one message) hands all its jobs to the host at once,
    before it waits for any: the model batches what is in flight, and waiting job by job
    would run a message's jobs one forward each. A duplicate id runs once."""
    handed: list[list[str]] = []

    def process_many(job_ids: list[str], worker: str) -> dict[str, JobFuture]:
        handed.append(list(job_ids))
        return {j: _future(result={"id": j, "status": "succeeded"}, attempt=1)
                for j in job_ids}

    monkeypatch.setattr(tasks.app._runtime.host, "process_many", process_many,
                        raising=False)
    assert tasks.run_jobs(["a", "b", "a", "c"]) == {"jobs": 3, "succeeded": 3}
    assert handed == [["a", "b", "c"]]


def test_a_batch_message_rides_out_an_outage_and_fails_only_its_bad_job(outage,
                                                                         monkeypatch):
    """A minute's broker outage: the message's tries fail for every job until it ends,
    then they succeed. An internal error of one job is recorded as that job's failure,
    fenced by its start; the others still run and the message is acknowledged (the
    task returns)."""
    outage.outage_s = 60.0
    assert tasks.run_jobs(["a", "b"]) == {"jobs": 2, "succeeded": 2}
    assert outage.failures == []
    monkeypatch.setattr(tasks.app._runtime.host, "process_many", lambda job_ids, worker: {
        "a": _future(result={"id": "a", "status": "succeeded"}, attempt=1),
        "b": _future(error=ValueError("bad row"), attempt=4),
        "c": _future(result={"id": "c", "status": "succeeded"}, attempt=1)})
    assert tasks.run_jobs(["a", "b", "c"]) == {"jobs": 3, "succeeded": 2, "failed": 1}
    assert outage.failures == [("internal error: ValueError: bad row", 4)]


def test_a_database_error_is_recorded_as_one_line_without_its_statement():
    """A prediction PostgreSQL refused (NaN in JSON) failed its job with the whole
    statement and its parameters as the error: the driver's first line now."""
    import sqlalchemy.exc

    orig = ValueError("invalid input syntax for type json\nDETAIL: Token \"NaN\" is invalid.")
    e = sqlalchemy.exc.DataError("INSERT INTO predictions (job_id, labels) VALUES (...)",
                                 {"labels": "[[\"a\", NaN]]"}, orig)
    assert tasks._failure(e, 1) == ("internal error: DataError: invalid input syntax for "
                                    "type json")


def test_after_an_outage_a_messages_jobs_are_tried_again_together(outage):
    """The store is away for 10 s while a 16-job message runs. Its jobs are tried again
    together, one backoff per round (1+2+4+8 s), and batch again. Before, each job waited
    out a backoff of its own and ran alone, one after another: 15 more seconds and 15
    forwards of one job for this message (a worker recovered at about 1 job/s)."""
    outage.outage_s = 10.0
    ids = [f"j{i}" for i in range(16)]
    assert tasks.run_jobs(ids) == {"jobs": 16, "succeeded": 16}
    assert outage.slept == [1, 2, 4, 8]
    assert outage.handed == [ids] * 5 and outage.alone == []


def test_only_the_jobs_that_failed_are_tried_again_and_each_keeps_its_fence(outage,
                                                                            monkeypatch):
    """Round one: a succeeds, b's outcome could not be recorded (its start, attempt 3,
    holds it), c never started. Both are tried again together until retries run out; the
    failures carry b's token 3 and none for c."""
    down = OperationalError("UPDATE jobs", {}, Exception("server closed the connection"))
    rounds = [{"a": _future(result={"id": "a", "status": "succeeded"}, attempt=1),
               "b": _future(error=down, attempt=3), "c": _future(error=down)}]
    handed: list[list[str]] = []

    def process_many(job_ids, worker):
        handed.append(list(job_ids))
        return rounds.pop(0) if rounds else {j: _future(error=down) for j in job_ids}

    monkeypatch.setattr(tasks.app._runtime.host, "process_many", process_many)
    assert tasks.run_jobs(["a", "b", "c"]) == {"jobs": 3, "succeeded": 1, "failed": 2}
    assert handed == [["a", "b", "c"]] + [["b", "c"]] * 10
    assert [(e.split(":")[0], t) for e, t in outage.failures] == [
        ("gave up after 10 retries", 3), ("gave up after 10 retries", None)]


def test_a_hand_over_that_fails_for_a_passing_reason_is_tried_again_together(outage,
                                                                             monkeypatch):
    def flaky(job_ids, worker):
        outage.handed.append(list(job_ids))
        if outage.clock < 10:
            raise RedisConnectionError("Error 111 connecting to redis: Connection refused")
        return {j: _future(result={"id": j, "status": "succeeded"}, attempt=1)
                for j in job_ids}

    monkeypatch.setattr(tasks.app._runtime.host, "process_many", flaky)
    assert tasks.run_jobs(["a", "b"]) == {"jobs": 2, "succeeded": 2}
    assert outage.failures == [] and outage.slept == [1, 2, 4, 8]
    assert outage.handed == [["a", "b"]] * 5


def test_a_hand_over_that_fails_by_a_bug_runs_each_job_alone(outage, monkeypatch):
    def broken(job_ids, worker):
        raise KeyError("a bug in the batch path")

    monkeypatch.setattr(tasks.app._runtime.host, "process_many", broken)
    outage.outage_s = 0.0
    assert tasks.run_jobs(["a", "b"]) == {"jobs": 2, "succeeded": 2}
    assert outage.alone == ["a", "b"] and outage.failures == []


def test_a_batch_job_that_runs_out_of_retries_is_logged_once_without_a_traceback(
        outage, caplog):
    """The same line as run_job's: which job and why it gave up; an outage's traceback
    is no news. run_jobs recorded the failure and logged nothing for the job."""
    with caplog.at_level("WARNING", logger=tasks.log.name):
        assert tasks.run_jobs(["a"]) == {"jobs": 1, "failed": 1}
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["job a: gave up after 10 retries: ConnectionError: Error 111 "
                      "connecting to redis: Connection refused"], errors
