"""The serving runtime without Celery: the host's store -> model -> store chain, the
group-commit writer, and errors crossing the model process's pipe. Real SQLite,
the real model; no broker, no worker process."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from core import store
from core.config import Settings
from core.errors import InvalidInput
from core.jobs import JobResult
from core.serving.contracts import DeadlineExceeded, Failure
from core.serving.host import InProcessModel, ModelHost
from core.serving.metrics import BatchMetrics
from core.serving.writer import GroupWriter
from core.store.migrations import upgrade


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    url = f"sqlite:///{tmp_path_factory.mktemp('host') / 'mmq.db'}"
    upgrade(url)
    return Settings(database_url=url, device="cpu", torch_threads=1, model_process=False)


@pytest.fixture(scope="module")
def host(settings):
    sessions = store.session_factory(store.make_engine(settings.db_url))
    model = InProcessModel(settings, "cpu", BatchMetrics())
    h = ModelHost(settings, model, model.metrics, sessions, GroupWriter(sessions))
    yield h
    h.close()


def _job(host: ModelHost, **kw) -> str:
    with host.tx() as s:
        return store.create_job(session=s, **kw).id


def _row(host: ModelHost, job_id: str):
    with host.sessions() as s:
        return store.get_job(session=s, job_id=job_id), store.get_prediction(session=s,
                                                                              job_id=job_id)


def test_a_job_runs_and_its_prediction_is_stored(host):
    job_id = _job(host, modality="text", task="classify", text="The striker scored twice.",
                  params={"labels": ["sport", "cooking"], "top_k": 1})
    summary = host.process(job_id, "w1").result(timeout=120)
    assert summary["status"] == "succeeded" and summary["top"][0] == "sport"
    job, pred = _row(host, job_id)
    assert (job.status, job.worker, job.attempts) == ("succeeded", "w1", 1)
    assert pred.labels[0][0] == "sport" and pred.dim == 384 and pred.model_version


def test_bad_input_fails_the_job_with_its_reason(host):
    job_id = _job(host, modality="image", task="embed", payload=b"\x89PNG\r\n\x1a\n broken")
    summary = host.process(job_id, "w1").result(timeout=60)
    job, pred = _row(host, job_id)
    assert summary["status"] == job.status == "failed" and pred is None
    assert "image" in job.error


def test_a_passed_deadline_cancels_the_job(host):
    job_id = _job(host, modality="text", task="embed", text="too late",
                  deadline=store.utcnow() - timedelta(seconds=1))
    assert host.process(job_id, "w1").result(timeout=60)["status"] == "cancelled"
    assert _row(host, job_id)[0].error == "deadline passed before it ran"


def test_terminal_and_unknown_jobs_are_not_run(host):
    job_id = _job(host, modality="text", task="embed", text="once")
    host.process(job_id, "w1").result(timeout=60)
    assert host.process(job_id, "w2").result(timeout=60)["status"] == "succeeded"
    assert _row(host, job_id)[0].attempts == 1  # not started again
    assert host.process("no-such-job", "w1").result(timeout=60)["status"] == "unknown"


def test_one_bad_write_in_a_group_fails_alone(host):
    """The writer retries a failed group one request at a time."""
    job_id = _job(host, modality="text", task="embed", text="grouped")
    host.writer.start(job_id, "w1").result(timeout=60)

    def boom(_session):
        raise RuntimeError("a write that fails")

    bad = host.writer.call(boom)
    good = host.writer.finish(job_id, 1, "v-test", JobResult(tokens=3))
    with pytest.raises(RuntimeError):
        bad.result(timeout=60)
    good.result(timeout=60)
    job, pred = _row(host, job_id)
    assert job.status == "succeeded" and pred.tokens == 3 and pred.model_version == "v-test"


def test_errors_keep_their_type_kind_and_index_across_the_pipe():
    e = InvalidInput("too big", index=3, kind=InvalidInput.TOO_LARGE)
    back = Failure.of(e).exception()
    assert isinstance(back, InvalidInput)
    assert (back.reason, back.index, back.kind) == ("too big", 3, InvalidInput.TOO_LARGE)
    assert isinstance(Failure.of(DeadlineExceeded("late")).exception(), DeadlineExceeded)
    assert "KeyError" in str(Failure.of(KeyError("x")).exception())


def test_a_lease_hands_back_abandoned_jobs_and_sweeps_only_when_healthy(host):
    import time

    from core.serving.lease import LeaseKeeper

    lease = LeaseKeeper(host, "w-lease", "text")
    job_id = _job(host, modality="text", task="embed", text="abandoned")
    host.writer.start(job_id, "w-lease").result(timeout=60)
    assert not lease.may_sweep()  # never renewed yet
    lease.abandon(job_id)
    lease.tick()
    job = _row(host, job_id)[0]
    assert (job.status, job.worker, job.sent_at) == ("queued", None, None)
    with host.sessions() as s:
        assert "w-lease" in store.live_workers(session=s, lease=timedelta(seconds=60))
    lease.healthy_since = time.monotonic()  # just back from an outage: not yet
    assert not lease.may_sweep()
    lease.healthy_since = time.monotonic() - host.settings.lease_s
    assert lease.may_sweep()


def test_task_summary_shows_the_start_of_a_transcript():
    """Flower's task list shows the task's summary: a transcribed job says what was said."""
    import numpy as np

    from core.jobs import JobResult
    from core.serving.stages import summary as _summary

    long = _summary("j", "audio", JobResult(embedding=np.zeros(384, "f4"), text="so " * 60), "v")
    assert long["text"].startswith("so so") and len(long["text"]) == 80
    short = _summary("j", "audio", JobResult(embedding=np.zeros(384, "f4"), text="Yes."), "v")
    assert short["text"] == "Yes." and "embedding_dim" not in short
    assert "text" not in _summary("j", "text", JobResult(embedding=np.zeros(384, "f4")), "v")


# -- the stages with a stand-in model: the fence, late outcomes, cancels ------------------


class HeldModel:
    """A model backend whose answers the test gives: each request waits in ``requests``
    with its future until the test resolves it."""

    version, device, cfg = "held-1", "cpu", None

    def __init__(self):
        self.requests: dict[str, tuple] = {}
        self.cancelled: list[str] = []

    def submit(self, request):
        from concurrent.futures import Future

        fut = Future()
        self.requests[request.job_id] = (request, fut)
        return fut

    def submit_many(self, requests):
        self.handovers = getattr(self, "handovers", 0) + 1
        return [self.submit(r) for r in requests]

    def cancel(self, job_ids):
        self.cancelled += job_ids

    def close(self) -> None:
        pass

    def wait_for(self, job_id: str):
        import time

        deadline = time.monotonic() + 30
        while job_id not in self.requests:
            assert time.monotonic() < deadline, f"{job_id} never reached the model"
            time.sleep(0.005)
        return self.requests[job_id]


@pytest.fixture
def held(settings):
    sessions = store.session_factory(store.make_engine(settings.db_url))
    return ModelHost(settings, HeldModel(), BatchMetrics(), sessions, GroupWriter(sessions))


def test_the_fencing_token_travels_from_the_start_to_the_record(held):
    job_id = _job(held, modality="text", task="classify", text="x",
                  params={"labels": ["a", "b"], "top_k": 2})
    done = held.process(job_id, "w1")
    request, fut = held.model.wait_for(job_id)
    assert done.attempt == request.attempt == _row(held, job_id)[0].attempts == 1
    assert (request.labels, request.top_k, request.payload) == (["a", "b"], 2, "x")
    assert held.inflight == {job_id: 1}  # what a cancel check asks about
    fut.set_result(JobResult(embedding=np.zeros(384, "f4"), tokens=1))
    summary = done.result(timeout=30)
    assert summary["status"] == "succeeded" and summary["model_version"] == "held-1"
    assert held.inflight == {}


def test_a_late_result_is_dropped_and_counted(held):
    """While the model ran, the job was handed to another attempt: the result of this
    one is refused by the store's fence, counted, and the newer attempt's hold stands."""
    job_id = _job(held, modality="text", task="embed", text="slow")
    done = held.process(job_id, "w1")
    _, fut = held.model.wait_for(job_id)
    held.writer.start(job_id, "w1").result(timeout=30)  # attempt 2 takes the job over
    fut.set_result(JobResult(embedding=np.zeros(384, "f4"), tokens=1))
    summary = done.result(timeout=30)
    assert summary == {"job": job_id, "modality": "text", "status": "dropped",
                       "reason": "late result of attempt 1"}
    assert held.metrics.late == 1
    job, pred = _row(held, job_id)
    assert (job.status, job.attempts, pred) == ("running", 2, None)


def test_a_cancel_reaches_the_model_and_its_job_ends_cancelled(held):
    from core.serving.contracts import Cancelled

    job_id = _job(held, modality="text", task="embed", text="unwanted")
    done = held.process(job_id, "w1")
    _, fut = held.model.wait_for(job_id)
    assert held.check_cancelled() == []
    with held.tx() as s:
        assert store.cancel_job(session=s, job_id=job_id)
    assert held.check_cancelled() == [job_id] and held.model.cancelled == [job_id]
    fut.set_exception(Cancelled("cancelled before its batch ran"))
    assert done.result(timeout=30)["status"] == "cancelled"
    assert _row(held, job_id)[0].status == "cancelled"


def test_a_lease_renewal_drops_the_cancelled_jobs_in_flight(held):
    from core.serving.lease import LeaseKeeper

    job_id = _job(held, modality="text", task="embed", text="renewed")
    held.process(job_id, "w-renew")
    held.model.wait_for(job_id)
    with held.tx() as s:
        store.cancel_job(session=s, job_id=job_id)
    LeaseKeeper(held, "w-renew", "text").renew()
    assert held.model.cancelled == [job_id]


def test_a_model_error_fails_the_task_and_the_task_fences_its_record(held):
    """An internal error reaches the task (which records it, fenced by the start's
    token); a failure of an attempt that no longer holds the job is dropped."""
    job_id = _job(held, modality="text", task="embed", text="boom")
    done = held.process(job_id, "w1")
    _, fut = held.model.wait_for(job_id)
    fut.set_exception(RuntimeError("device lost"))
    with pytest.raises(RuntimeError, match="device lost"):
        done.result(timeout=30)
    assert done.attempt == 1
    assert held.record_failure(job_id, "internal error", attempt=2) is False
    assert held.record_failure(job_id, "internal error", attempt=done.attempt) is True
    assert _row(held, job_id)[0].status == "failed"


# -- a message's jobs together (BatchRun) -------------------------------------------------


def _ops(host: ModelHost, monkeypatch) -> list:
    """-> the writer ops the host submits from now on (kinds, in order)."""
    seen: list = []
    submit = host.writer.submit
    monkeypatch.setattr(host.writer, "submit", lambda op: seen.append(type(op).__name__)
                        or submit(op))
    return seen


def test_a_messages_jobs_end_as_they_would_one_by_one(host, monkeypatch):
    """Every kind of outcome in one message, run together: each job ends as ``process``
    ends it alone, and the successes take one start and one record op between them."""
    sport = _job(host, modality="text", task="classify", text="The striker scored twice.",
                 params={"labels": ["sport", "cooking"], "top_k": 1})
    plain = _job(host, modality="text", task="embed", text="A plain sentence.")
    broken = _job(host, modality="image", task="embed", payload=b"\x89PNG\r\n\x1a\n broken")
    late = _job(host, modality="text", task="embed", text="too late",
                deadline=store.utcnow() - timedelta(seconds=1))
    done = _job(host, modality="text", task="embed", text="done before")
    host.process(done, "w1").result(timeout=60)
    ops = _ops(host, monkeypatch)
    ids = [sport, plain, broken, late, done, "no-such-job", plain]
    futs = host.process_many(ids, "w1")
    assert list(futs) == [sport, plain, broken, late, done, "no-such-job"]  # plain once
    out = {j: f.result(timeout=120) for j, f in futs.items()}
    assert out[sport]["status"] == "succeeded" and out[sport]["top"][0] == "sport"
    assert out[plain]["status"] == "succeeded" and out[plain]["embedding_dim"] == 384
    assert out[broken]["status"] == "failed" and "image" in out[broken]["error"]
    assert out[late] == {"job": late, "modality": "text", "status": "cancelled",
                         "error": "deadline passed before it ran"}
    assert out[done] == {"job": done, "status": "succeeded"}
    assert out["no-such-job"] == {"job": "no-such-job", "status": "unknown"}
    assert ops.count("StartManyOp") == 1 and ops.count("FinishManyOp") == 1
    assert "StartOp" not in ops and "FinishOp" not in ops
    for job_id, status in [(sport, "succeeded"), (plain, "succeeded"), (broken, "failed"),
                           (late, "cancelled"), (done, "succeeded")]:
        job, pred = _row(host, job_id)
        assert (job.status, job.attempts) == (status, 1)
        assert (pred is not None) == (status == "succeeded")
        assert futs[job_id].attempt == (None if job_id == done else 1)  # started here
    assert _row(host, sport)[1].labels[0][0] == "sport"


def test_a_messages_results_that_come_back_together_are_recorded_together(held, monkeypatch):
    """Results the model hands back together (one report: resolved inside one
    ``Drain.deferred`` block) go to the store in one record op; one that comes back
    later does not hold them. A result whose job was meanwhile taken over is dropped
    alone, and an internal error fails only its own job (the task retries that one)."""
    from core.serving.drain import Drain

    ops = _ops(held, monkeypatch)
    ids = [_job(held, modality="text", task="embed", text=f"t{i}") for i in range(5)]
    futs = held.process_many(ids, "w1")
    reqs = {j: held.model.wait_for(j) for j in ids}
    assert held.model.handovers == 1 and held.inflight == dict.fromkeys(ids, 1)
    held.writer.start(ids[1], "w1").result(timeout=30)  # attempt 2 takes ids[1] over
    emb = JobResult(embedding=np.zeros(384, "f4"), tokens=1)
    with Drain.deferred():  # one report from the model process
        for j in ids[:3]:
            reqs[j][1].set_result(emb)
        reqs[ids[3]][1].set_exception(RuntimeError("device lost"))
    assert futs[ids[0]].result(timeout=30)["status"] == "succeeded"  # ids[4] still out
    assert futs[ids[2]].result(timeout=30)["status"] == "succeeded"
    assert futs[ids[1]].result(timeout=30) == {
        "job": ids[1], "modality": "text", "status": "dropped",
        "reason": "late result of attempt 1"}
    with pytest.raises(RuntimeError, match="device lost"):
        futs[ids[3]].result(timeout=30)
    assert futs[ids[3]].attempt == 1  # the task's failure is fenced by it
    assert ops.count("FinishManyOp") == 1 and not futs[ids[4]].done()
    reqs[ids[4]][1].set_result(emb)  # a later report: its own record op
    assert futs[ids[4]].result(timeout=30)["status"] == "succeeded"
    assert ops.count("FinishManyOp") == 2
    assert [_row(held, j)[0].status for j in ids] == ["succeeded", "running", "succeeded",
                                                        "running", "succeeded"]
    assert held.inflight == {}


def test_one_jobs_broken_row_fails_that_job_alone(held, monkeypatch):
    """A job whose prepare stage raises (a row no rule refuses, that still breaks:
    ``top_k`` null) fails alone, fenced by its start; the message's other jobs run."""
    ids = [_job(held, modality="text", task="embed", text=f"b{i}") for i in range(3)]
    request = held.request

    def broken(start):
        if start.job.id == ids[0]:
            raise TypeError("int() argument must be a string or a number, not 'NoneType'")
        return request(start)

    monkeypatch.setattr(held, "request", broken)
    futs = held.process_many(ids, "w1")
    with pytest.raises(TypeError):
        futs[ids[0]].result(timeout=30)
    assert futs[ids[0]].attempt == 1
    for j in ids[1:]:
        held.model.wait_for(j)[1].set_result(JobResult(embedding=np.zeros(384, "f4")))
        assert futs[j].result(timeout=30)["status"] == "succeeded"
    assert ids[0] not in held.model.requests


def test_two_attempts_of_a_job_in_one_group_are_each_fenced_by_their_own(settings):
    """A job started again on the same worker (a redelivered message) while its first
    attempt still ran: both results can meet in one group commit. Keyed by job id, the
    last op's attempt fenced both: attempt 2's result was dropped with attempt 1's, and
    the job stayed running."""
    from core.serving.writer import FinishOp, _finish_many, _start_many

    url_sessions = store.session_factory(store.make_engine(settings.db_url))
    with url_sessions.begin() as s:
        job_id = store.create_job(session=s, modality="text", task="embed", text="twice").id
    for _ in range(2):
        with url_sessions.begin() as s:
            _start_many(s, [(job_id, "w1")], timedelta(seconds=20))
    r = JobResult(embedding=np.zeros(384, "f4"), tokens=1)
    with url_sessions.begin() as s:
        ops = [FinishOp(job_id, 2, "v", r), FinishOp(job_id, 1, "v", r)]
        assert _finish_many(s, ops) == [True, False]
    with url_sessions() as s:
        assert store.get_job(session=s, job_id=job_id).status == "succeeded"


def _failed(e: BaseException):
    from concurrent.futures import Future

    f: Future = Future()
    f.set_exception(e)
    return f


def test_a_message_whose_start_fails_runs_its_jobs_one_by_one(held, monkeypatch):
    """A failed start of the whole message (a row that breaks it, or an outage) falls
    back to one start per job, so a bad row fails alone; in an outage every job fails,
    unstarted, for the task to retry."""
    from sqlalchemy.exc import OperationalError

    down = OperationalError("UPDATE jobs", {}, Exception("server closed"))
    monkeypatch.setattr(held.writer, "start_many", lambda job_ids, worker: _failed(down))
    ids = [_job(held, modality="text", task="embed", text=f"s{i}") for i in range(2)]
    futs = held.process_many(ids, "w1")
    for j in ids:
        _, fut = held.model.wait_for(j)
        assert futs[j].attempt == 1  # while it runs: a failure the task records is fenced
        fut.set_result(JobResult(embedding=np.zeros(384, "f4")))
        assert futs[j].result(timeout=30)["status"] == "succeeded" and futs[j].attempt == 1
    assert getattr(held.model, "handovers", 0) == 0  # each handed over alone
    monkeypatch.setattr(held.writer, "start", lambda job_id, worker: _failed(down))
    for f in held.process_many(["a", "b"], "w1").values():
        with pytest.raises(OperationalError):
            f.result(timeout=5)
        assert f.attempt is None  # nothing started: the task's retries start afresh


def test_a_message_whose_record_fails_records_its_results_one_by_one(held, monkeypatch):
    """A failed record of the message's results is written again job by job: one result
    the store refuses fails alone, the others are recorded."""
    monkeypatch.setattr(held.writer, "finish_many",
                        lambda ops: _failed(RuntimeError("one bad row")))
    ids = [_job(held, modality="text", task="embed", text=f"r{i}") for i in range(3)]
    futs = held.process_many(ids, "w1")
    reqs = {j: held.model.wait_for(j) for j in ids}
    finish = held.writer.finish

    def refuse_second(job_id, attempt, version, result):
        return _failed(ValueError("bad row")) if job_id == ids[1] else finish(
            job_id, attempt, version, result)

    monkeypatch.setattr(held.writer, "finish", refuse_second)
    for j in ids:
        reqs[j][1].set_result(JobResult(embedding=np.zeros(384, "f4")))
    assert [futs[j].result(timeout=30)["status"] for j in (ids[0], ids[2])] == [
        "succeeded", "succeeded"]
    with pytest.raises(ValueError, match="bad row"):
        futs[ids[1]].result(timeout=30)
    assert [_row(held, j)[0].status for j in ids] == ["succeeded", "running", "succeeded"]


def test_a_worker_loads_its_own_tower_before_it_says_it_is_ready(settings):
    """The speech and image towers load on first use; a worker's own is loaded while
    it starts, so that "ready" means its first job pays no loading (Whisper took about
    1.5 s of the first audio job), and the other towers stay unloaded."""
    model = InProcessModel(settings, "cpu", BatchMetrics(), "audio")
    try:
        assert model.model.towers["audio"]._tower is not None
        assert model.model.towers["image"]._photo is None
    finally:
        model.batcher.stop()
