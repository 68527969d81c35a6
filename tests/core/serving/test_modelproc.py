"""The model process: its wire messages name each job and its attempt (the fencing
token) both ways; the child prepares, batches and answers; the parent resolves each
future by (job id, attempt). The child's side runs in this process over a real pipe
with a stand-in model; one test spawns the real model process."""

from __future__ import annotations

import io
import multiprocessing as mp
import time
from typing import NamedTuple

import pytest
from PIL import Image

from core.config import Settings
from core.errors import InvalidInput
from core.jobs import JobResult
from core.serving.batcher import BatcherConfig, DynamicBatcher
from core.serving.contracts import Cancelled, Failure, JobRequest
from core.serving.metrics import BatchMetrics
from core.serving.modelproc import (
    Cancel,
    Outcome,
    Report,
    Submit,
    _accept,
    _Outbox,
    _receive,
)


class Prepared(NamedTuple):
    tokens: int
    text: str


class WordModel:
    """Stands in for MultimodalModel: text only; a word is a token; empty text is
    bad input; the "embedding" is the text itself."""

    modalities = ("text",)

    def prepare_many(self, modality: str, payloads: list) -> list:
        if modality != "text":
            raise ValueError(f"unknown modality {modality!r}")
        return [Prepared(len(p.split()), p) if p else InvalidInput("empty text", index=0)
                for p in payloads]

    def predict(self, modality: str, prepared: list[Prepared], asks) -> list[JobResult]:
        return [JobResult(tokens=p.tokens, text=p.text.upper()) for p in prepared]


def _request(job_id: str, attempt: int, payload, modality: str = "text") -> JobRequest:
    return JobRequest(job_id, attempt, modality, payload, None, 5, None)


@pytest.fixture
def child():
    """The child's side (outbox, batcher) over a real pipe; -> (parent end, accept)."""
    parent_conn, child_conn = mp.Pipe()
    model = WordModel()
    outbox = _Outbox(child_conn)
    batcher = DynamicBatcher(model, BatcherConfig(max_wait_ms=600_000, max_batch_size=2),
                             BatchMetrics(sinks=[outbox]), after_batch=outbox.flush)
    yield parent_conn, lambda reqs: _accept(model, batcher, outbox, reqs), batcher
    batcher.stop()


def _outcomes(conn, n: int) -> tuple[dict, list[Report]]:
    """Reports until ``n`` outcomes came -> ({(job id, attempt): result}, reports)."""
    got: dict = {}
    reports: list[Report] = []
    while len(got) < n:
        assert conn.poll(30), f"only {len(got)} of {n} outcomes came back"
        report = conn.recv()
        assert isinstance(report, Report)
        reports.append(report)
        got |= {(o.job_id, o.attempt): o.result for o in report.outcomes}
    return got, reports


def test_the_child_answers_each_job_by_id_and_attempt(child):
    conn, accept, _ = child
    accept([_request("a", 1, "one two"), _request("a", 2, "one two three"),
            _request("b", 7, ""), _request("c", 1, "hi", modality="smell")])
    got, reports = _outcomes(conn, 4)
    assert got[("a", 1)] == JobResult(tokens=2, text="ONE TWO")
    assert got[("a", 2)].tokens == 3  # the same job, another attempt: its own answer
    bad, unknown = got[("b", 7)], got[("c", 1)]
    assert isinstance(bad, Failure) and bad.kind == "invalid" and bad.message == "empty text"
    assert isinstance(unknown, Failure) and "unknown modality" in unknown.message
    # The batch (a 1 and a 2: max_batch_size=2) was observed, in the same message
    # as its results.
    batches = [b for r in reports for b in r.batches]
    assert [(b["modality"], b["size"], b["tokens"]) for b in batches] == [("text", 2, 5)]
    [with_batch] = [r for r in reports if r.batches]
    assert {("a", 1), ("a", 2)} <= {(o.job_id, o.attempt) for o in with_batch.outcomes}


def test_a_cancel_drops_a_waiting_job_and_says_so(child):
    conn, accept, batcher = child
    accept([_request("slow", 4, "waits for company")])  # a 10-minute timer: it waits
    assert batcher.cancel({"slow"}) == 1
    batcher.metrics.sinks[0].flush()  # as the next batch would
    got, _ = _outcomes(conn, 1)
    failure = got[("slow", 4)]
    assert isinstance(failure, Failure) and isinstance(failure.exception(), Cancelled)


def test_the_child_takes_every_waiting_message_in_one_go():
    """Requests and cancels that queued up while the child was busy are read
    together: one tokenizer call for all the requests, the cancels after them."""
    parent, child = mp.Pipe()
    r1, r2 = _request("a", 1, "x"), _request("b", 1, "y")
    parent.send(Submit([r1]))
    parent.send(Cancel(["a", "z"]))
    parent.send(Submit([r2]))
    time.sleep(0.05)  # all three in the pipe
    assert _receive(child) == ([r1, r2], {"a", "z"})


def test_outcomes_pickle_as_small_tuples():
    """One Outcome per job crosses the pipe: it must stay a plain tuple on the wire."""
    assert isinstance(Outcome("j", 1, JobResult()), tuple)


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(device="cpu", torch_threads=1)


def test_the_model_process_answers_a_bad_item_with_its_input_kind(settings):
    """A real spawned model process: an undecodable image comes back as InvalidInput
    of kind "unsupported_media" (HTTP 415), a good one as a JobResult. Two attempts of
    one job are told apart; the child's batch observations reach the parent's metrics."""
    from core.serving.modelproc import ModelProcess

    metrics = BatchMetrics()
    proc = ModelProcess(settings, "cpu", metrics, modality="image")
    try:
        assert proc.cfg.streams == 1  # an image worker's batcher: one forward at a time
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "PNG")
        bad = proc.submit(JobRequest("j-bad", 1, "image", b"GIF89a not really", None, 5, None))
        good = proc.submit(JobRequest("j-good", 1, "image", buf.getvalue(), ["red", "blue"], 1,
                                      None))
        again = proc.submit(JobRequest("j-good", 2, "image", buf.getvalue(), None, 1, None))
        # A second delivery of an attempt in flight shares its run (it failed the job
        # with "already in the model process" in bench/cluster.py's link cut).
        assert proc.submit(JobRequest("j-good", 2, "image", buf.getvalue(), None, 1,
                                      None)) is again
        with pytest.raises(InvalidInput) as err:
            bad.result(timeout=120)
        assert err.value.kind == InvalidInput.UNSUPPORTED
        result = good.result(timeout=120)
        assert isinstance(result, JobResult) and result.embedding.shape == (384,)
        assert len(result.labels) == 1
        assert again.result(timeout=120).labels is None  # attempt 2's own request
        deadline = time.monotonic() + 30
        while metrics.jobs < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # replayed by the receiver just after it resolves the futures
        assert metrics.jobs == 2
    finally:
        proc.close()
