"""The task's retries through a store or broker outage, on a simulated clock: how many,
how long, and that a minute's outage is ridden out (no worker, no real sleeping)."""

from types import SimpleNamespace

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from core.config import Settings
from core.serving.host import JobFuture
from workers import tasks


@pytest.fixture
def outage(monkeypatch):
    """-> state of a broker outage that lasts ``state.outage_s`` simulated seconds;
    the task's sleeps advance the simulated clock instead of waiting."""
    state = SimpleNamespace(clock=0.0, slept=[], failures=[], outage_s=float("inf"))

    def process(job_id: str, worker: str) -> JobFuture:
        if state.clock < state.outage_s:
            raise RedisConnectionError("Error 111 connecting to redis: Connection refused")
        fut = JobFuture()
        fut.set_result({"id": job_id, "status": "succeeded"})
        return fut

    def sleep(s: float) -> None:
        state.slept.append(s)
        state.clock += s

    monkeypatch.setattr(tasks, "host", lambda: SimpleNamespace(settings=Settings(),
                                                               process=process))
    monkeypatch.setattr(tasks, "time", SimpleNamespace(sleep=sleep))
    monkeypatch.setattr(tasks, "_record_failure",
                        lambda job_id, error, attempt: state.failures.append(error))
    return state


def test_retries_are_ten_with_backoff_capped_at_30_s(outage):
    """The documented policy (core/config.py): 10 retries, 1+2+4+8+16+30*5 = 181 s,
    then the failure is recorded. Setting the count to 1 made no test fail."""
    with pytest.raises(RedisConnectionError):
        tasks.run_job("job-1")
    assert outage.slept == [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]
    assert sum(outage.slept) == 181
    assert len(outage.failures) == 1 and outage.failures[0].startswith("gave up after 10 ")


def test_a_minute_long_outage_is_ridden_out(outage):
    outage.outage_s = 60.0
    assert tasks.run_job("job-1") == {"id": "job-1", "status": "succeeded"}
    assert outage.failures == [] and sum(outage.slept) >= 60
