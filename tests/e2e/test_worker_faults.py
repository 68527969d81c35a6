"""Worker processes under faults, end to end: a job run twice at once, a deadline that
passes while the job waits, a model process that dies, a cancel that comes too late.

The model of each worker runs in a child process (core/serving/modelproc.py). Stopping
that child with SIGSTOP holds a job mid-run for as long as a test needs, as a slow
batch, a wedged device or a paused VM would: the worker has started the job in SQL
and has not finished it.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core import store
from core.config import Settings
from producer.sdk import Client
from tests.helpers import model_child, service_env

KEY = "faults-key"


def poll(fn, timeout: float, what: str):
    """fn() until it returns something truthy; generous timeouts, no timing asserts."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := fn():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_row(client: Client, job_id: str) -> store.Job:
    with client.sessions() as s:
        return store.get_job(session=s, job_id=job_id)


def prediction_row(client: Client, job_id: str) -> store.Prediction | None:
    with client.sessions() as s:
        return store.get_prediction(session=s, job_id=job_id)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """One database is enough where SQL is not what the test is about."""
    return f"sqlite:///{tmp_path / 'mmq.db'}"


def test_a_redelivered_message_does_not_take_a_job_from_its_live_worker(
        broker_url, sqlite_url, start_worker):
    """Production's double delivery: a job outlives the visibility timeout and Redis
    hands its message to a second worker while the first still runs it. The second
    must not start it (that took the job from the attempt holding it, whose result then
    came late and was dropped, and ran the job twice): it acknowledges its copy and the
    first run's outcome is the job's. One database: the start's rule is held on both
    by tests/core/store/test_fence.py."""
    from core.broker.sweep import live_job_ids

    database_url = sqlite_url
    client = Client(broker_url=broker_url, database_url=database_url)

    # The restore timer runs every 10 s; 2 s of visibility makes the message
    # visible again at the first tick after the first worker took it.
    env = service_env(broker_url, database_url, MMQ_VISIBILITY_TIMEOUT=2,
                      MMQ_REQUEUE_EVERY_S=0)
    # One task thread: the first worker cannot take the restored message itself.
    first = start_worker("text", env, concurrency=1)
    first_model = model_child(first)
    os.kill(first_model, signal.SIGSTOP)  # the first run will hang inside the model
    try:
        (job_id,) = client.submit_many([{"modality": "text", "input": "run me once"}])
        poll(lambda: job_row(client, job_id).status == "running", 120, "the first run")
        start_worker("text", env, concurrency=1)
        settings = Settings(broker_url=broker_url, database_url=database_url)
        # Redelivered (the restore put it back), taken by the second worker, and
        # acknowledged by it without a start: no message of the job is left anywhere.
        poll(lambda: job_id not in live_job_ids(settings, ("text",)), 180,
             "the second worker to take the redelivered message and let it go")
        j = job_row(client, job_id)
        assert (j.status, j.attempts) == ("running", 1)
        assert j.worker.startswith(f"text-{first.proc.pid}.")
    finally:
        os.kill(first_model, signal.SIGCONT)
    done = poll(lambda: (j := job_row(client, job_id)).status == "succeeded" and j, 120,
                "the first run to finish")
    assert done.attempts == 1 and done.worker.startswith(f"text-{first.proc.pid}.")
    with client.sessions() as s:
        rows = s.scalar(select(func.count()).select_from(store.Prediction)
                        .where(store.Prediction.job_id == job_id))
    assert rows == 1 and prediction_row(client, job_id).dim == 384
    assert "dropped the late" not in first.log.read_text()
    client.close()


def test_a_deadline_that_passes_while_waiting_cancels_the_job(broker_url, sqlite_url,
                                                              start_worker):
    client = Client(broker_url=broker_url, database_url=sqlite_url)
    # No worker yet: the jobs wait in the queue past their deadline.
    late, fine = client.submit_many([
        {"modality": "text", "input": "too late", "timeout_s": 0.5},
        {"modality": "text", "input": "no deadline"}])
    time.sleep(1)
    start_worker("text", service_env(broker_url, sqlite_url))
    res = {r["id"]: r for r in client.wait([late, fine], timeout=120)}
    client.close()
    assert res[late]["status"] == "cancelled", res[late]
    assert "deadline" in res[late]["error"] and res[late]["prediction"] is None
    assert res[fine]["status"] == "succeeded"


def test_the_worker_exits_when_its_model_process_dies(broker_url, sqlite_url, start_worker):
    """Its unacknowledged messages then go to another worker; a worker that stayed up
    without a model would hold them and fail every job."""
    worker = start_worker("text", service_env(broker_url, sqlite_url))
    os.kill(model_child(worker), signal.SIGKILL)
    code = poll(lambda: worker.proc.poll(), 60, "the worker to exit")
    assert code != 0, worker.log.read_text()[-2000:]
    assert "model process died" in worker.log.read_text()


def test_cancelling_a_running_job_holds(broker_url, sqlite_url, start_worker):
    """DELETE of a running job: 200 and ``cancelled`` at once; the worker's run is not
    interrupted, its outcome is discarded, and the job stays cancelled with no
    prediction. A second DELETE answers the same."""
    from producer.api import create_app

    worker = start_worker("text", service_env(broker_url, sqlite_url))
    model = model_child(worker)
    os.kill(model, signal.SIGSTOP)  # hold the job in `running`
    app = create_app(Settings(broker_url=broker_url, database_url=sqlite_url, api_keys=KEY))
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        with TestClient(app) as http:
            r = http.post("/v1/jobs", headers=auth, json={"text": "hold me"})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            poll(lambda: http.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"]
                 == "running", 120, "the job to start")
            r = http.delete(f"/v1/jobs/{job_id}", headers=auth)
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "cancelled"
            assert r.json()["error"] == "cancelled while running"
            r = http.delete(f"/v1/jobs/{job_id}", headers=auth)  # idempotent
            assert r.status_code == 200 and r.json()["status"] == "cancelled"
            os.kill(model, signal.SIGCONT)
            # Dropped from its batch (the lease renewal told the model process), or run
            # and its result refused by the fence: either way it stays cancelled.
            poll(lambda: "dropped from their batches" in worker.log.read_text()
                 or "dropped the late result" in worker.log.read_text(), 60,
                 "the worker to let go of the cancelled job")
            r = http.get(f"/v1/jobs/{job_id}", headers=auth)
            assert r.json()["status"] == "cancelled" and r.json()["prediction"] is None
    finally:
        os.kill(model, signal.SIGCONT)
        app.state.client.close()


def test_a_job_cancelled_after_its_stalled_worker_lost_it_stays_cancelled(
        broker_url, sqlite_url, start_worker):
    """The issue's reproduction: a running job's worker stalls past its lease (SIGSTOP
    of the worker's main process); the sweep hands the job back to ``queued``; its
    owner cancels it; the worker resumes and finishes. Before the fence, the job came
    back ``succeeded`` with a prediction. One database: the fence's SQL is held on both
    by tests/core/store/test_fence.py."""
    from core.broker.sweep import sweep

    database_url = sqlite_url
    client = Client(broker_url=broker_url, database_url=database_url)
    env = service_env(broker_url, database_url, MMQ_LEASE_S=3, MMQ_LEASE_RENEW_S=1,
                      MMQ_REQUEUE_EVERY_S=0)
    worker = start_worker("text", env, concurrency=1)
    model = model_child(worker)
    os.kill(model, signal.SIGSTOP)  # hold the job inside the model
    try:
        (job_id,) = client.submit_many([{"modality": "text", "input": "stall me"}])
        poll(lambda: job_row(client, job_id).status == "running", 120, "the job to start")
        os.kill(worker.proc.pid, signal.SIGSTOP)  # the whole worker stalls: no renewals
        os.kill(model, signal.SIGCONT)  # the result waits in the pipe for the worker
        settings = Settings(broker_url=broker_url, database_url=database_url, lease_s=3)
        poll(lambda: job_id in sweep(settings, modalities=("text",)).restored
             or job_row(client, job_id).status == "queued", 60,
             "the sweep to take the stalled worker's job back")
        assert client.cancel(job_id)
    finally:
        os.kill(model, signal.SIGCONT)
        os.kill(worker.proc.pid, signal.SIGCONT)
    poll(lambda: "dropped the late result of attempt 1" in worker.log.read_text(), 120,
         "the resumed worker's late result to be dropped")
    j = job_row(client, job_id)
    assert (j.status, j.error) == ("cancelled", "cancelled before it ran")
    assert prediction_row(client, job_id) is None
    client.close()
