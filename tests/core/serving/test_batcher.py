"""The dynamic batcher: budgets, waiting, deadlines, failure isolation, equality."""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from core.config import Settings
from core.serving.batcher import BatcherConfig, DeadlineExceeded, DynamicBatcher
from core.training.samples import sentences


class Spy:
    """The real model, recording each forward's batch; can fail on demand."""

    def __init__(self, model, fail_if=None):
        self.model, self.fail_if, self.batches = model, fail_if, []
        self.version = model.version

    def predict(self, modality, prepared, asks):
        self.batches.append([p.tokens for p in prepared])
        if self.fail_if and self.fail_if(prepared):
            raise self.fail_if(prepared)
        return self.model.predict(modality, prepared, asks)


def submit_all(batcher, model, texts, **kw):
    prepared = [model.prepare("text", t) for t in texts]
    with ThreadPoolExecutor(32) as pool:  # many task threads at once, as in a worker
        futs = list(pool.map(lambda p: batcher.submit("text", p, **kw), prepared))
    return [f.result(timeout=120) for f in futs], prepared


def test_concurrent_jobs_share_forwards_and_match_the_model(fp32_model):
    # fp32: the batcher must not change what the model computes. (In bf16 the rows of
    # one batch are not independent of its shape: oneDNN's AMX kernels pick their
    # blocking by the number of rows, and a text's embedding moved by up to 7e-4 when
    # its batch did; the precision tests bound bf16 against fp32.)
    model = fp32_model
    spy = Spy(model)
    b = DynamicBatcher(spy, BatcherConfig(max_batch_tokens=512, max_batch_size=16,
                                          max_wait_ms=20))
    texts = sentences(120, seed=3)
    results, prepared = submit_all(b, model, texts)
    b.stop()
    want = model.embed("text", texts)
    got = torch.from_numpy(np.stack([r.embedding for r in results]))
    assert (got - want).abs().max() <= 1e-5
    assert max(len(x) for x in spy.batches) > 1  # batching happened
    for sizes in spy.batches:  # budgets hold (a single oversized item may go alone)
        assert len(sizes) <= 16 and (sum(sizes) <= 512 or len(sizes) == 1)
    assert sum(len(x) for x in spy.batches) == 120
    assert b.metrics.summary()["jobs"] == 120 and b.metrics.batch_size.mean > 1


def test_a_full_batch_does_not_wait_for_the_timer(model):
    b = DynamicBatcher(model, BatcherConfig(max_batch_size=4, max_wait_ms=600_000))
    prepared = [model.prepare("text", f"item {i}") for i in range(4)]
    futs = [b.submit("text", p) for p in prepared]
    # With a 10-minute timer, only the size rule can release these in time.
    assert all(f.result(timeout=60).embedding.shape == (384,) for f in futs)
    b.stop()


def test_classify_in_the_batcher_thread(model):
    b = DynamicBatcher(model, BatcherConfig())
    p = model.prepare("text", "the bank raised interest rates")
    r = b.submit("text", p, labels=["sport", "finance"], top_k=1).result(timeout=60)
    b.stop()
    assert r.labels[0][0] == "finance" and len(r.labels) == 1


def test_past_deadline_items_are_dropped(model):
    import time

    b = DynamicBatcher(model, BatcherConfig())
    late = b.submit("text", model.prepare("text", "too late"), deadline=time.monotonic() - 1)
    ok = b.submit("text", model.prepare("text", "on time"), deadline=time.monotonic() + 60)
    with pytest.raises(DeadlineExceeded):
        late.result(timeout=60)
    assert ok.result(timeout=60).embedding.shape == (384,)
    b.stop()
    assert b.metrics.dropped == 1


def test_one_bad_item_fails_alone(model):
    poison = model.prepare("text", "poison pill")

    def fail_if(batch):
        return RuntimeError("kernel fault") if any(p is poison for p in batch) else None

    spy = Spy(model, fail_if)
    b = DynamicBatcher(spy, BatcherConfig(max_batch_size=8, max_wait_ms=50))
    good = [model.prepare("text", f"fine {i}") for i in range(7)]
    futs = [b.submit("text", p) for p in good[:3]] + [b.submit("text", poison)] + [
        b.submit("text", p) for p in good[3:]]
    outcomes = []
    for f in futs:
        try:
            outcomes.append(f.result(timeout=60).tokens > 0)
        except RuntimeError:
            outcomes.append("failed")
    b.stop()
    assert outcomes == [True] * 3 + ["failed"] + [True] * 4


def test_out_of_memory_splits_the_batch_before_failing_anyone(model):
    def fail_if(batch):
        return torch.OutOfMemoryError("CUDA out of memory") if len(batch) > 2 else None

    spy = Spy(model, fail_if)
    b = DynamicBatcher(spy, BatcherConfig(max_batch_size=8, max_wait_ms=200))
    futs = [b.submit("text", model.prepare("text", f"item {i}")) for i in range(8)]
    assert all(f.result(timeout=60).embedding.shape == (384,) for f in futs)
    b.stop()
    assert max(len(x) for x in spy.batches) == 8 and sorted({len(x) for x in spy.batches})[0] <= 2


def test_per_device_defaults():
    s = Settings()
    cpu = BatcherConfig.for_device(torch.device("cpu"), s)
    gpu = BatcherConfig.for_device(torch.device("cuda"), s)
    assert gpu.max_batch_tokens > cpu.max_batch_tokens and gpu.max_batch_size > cpu.max_batch_size
    off = BatcherConfig.for_device(torch.device("cpu"), Settings(max_batch_size=1))
    assert off.max_batch_size == 1
    # The model's own budget for long lists is the batcher's: computed in one place.
    assert s.batching("cpu")[0] == cpu.max_batch_tokens


def test_two_streams_for_text_workers_on_a_cpu_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    s = Settings()
    assert BatcherConfig.for_device(cpu, s, "text").streams == 2
    # Images and speech measured no faster (images slower) with two: bench/e2e.py --towers.
    assert BatcherConfig.for_device(cpu, s, "image").streams == 1
    assert BatcherConfig.for_device(cpu, s, "audio").streams == 1
    assert BatcherConfig.for_device(cuda, s, "text").streams == 1
    assert BatcherConfig.for_device(cpu, Settings(model_streams=3), "image").streams == 3


class CostOnly:
    """Records each batch's item costs and answers at once: the batching policy alone."""

    version = "cost-only"

    def __init__(self):
        self.batches: list[list[int]] = []

    def predict(self, modality, prepared, asks, adapters=None):
        from core.jobs import JobResult

        self.batches.append([p.tokens for p in prepared])
        return [JobResult(embedding=np.zeros(2, "f4"), tokens=p.tokens) for p in prepared]


def test_audio_batches_have_their_own_budget_and_a_long_clip_goes_alone():
    """Audio items cost encoder positions + decode steps (core/model/speech.py): a
    10-window clip runs alone, the short clips behind it share the next batches, and
    the text budget does not cap audio."""
    from types import SimpleNamespace

    rec = CostOnly()
    b = DynamicBatcher(rec, BatcherConfig(max_batch_tokens=100, max_batch_size=64,
                                          max_wait_ms=200, max_batch_frames=6400))
    long_clip = SimpleNamespace(tokens=15_600, truncated=False)
    short = [SimpleNamespace(tokens=1550, truncated=False) for _ in range(8)]
    futs = [b.submit("audio", long_clip)] + [b.submit("audio", p) for p in short]
    assert all(f.result(timeout=60).tokens in (15_600, 1550) for f in futs)
    b.stop()
    assert [15_600] in rec.batches  # alone
    mixed = [x for x in rec.batches if 15_600 in x and len(x) > 1]
    assert not mixed, rec.batches
    shorts = [x for x in rec.batches if 15_600 not in x]
    assert sum(map(len, shorts)) == 8 and max(map(len, shorts)) > 1  # over the text budget
    assert all(sum(x) <= 6400 for x in shorts), rec.batches


def test_a_cancelled_job_is_dropped_from_a_batch_that_has_not_started(model):
    """A DELETE of a running job reaches its worker's batcher: queued items are dropped
    (their futures raise Cancelled); the forward already running is not interrupted."""
    import threading

    from core.serving.contracts import Cancelled

    gate, entered = threading.Event(), threading.Event()

    class Held(Spy):
        def predict(self, modality, prepared, asks):
            entered.set()
            gate.wait(60)  # the first forward runs until the test lets it go
            return super().predict(modality, prepared, asks)

    b = DynamicBatcher(Held(model), BatcherConfig(max_batch_size=1, max_wait_ms=0))
    running = b.submit("text", model.prepare("text", "in the forward"), key="a")
    assert entered.wait(60)
    queued = [b.submit("text", model.prepare("text", f"waiting {i}"), key=k)
              for i, k in enumerate(("b", "c"))]
    assert b.cancel({"a", "b"}) == 1  # "a" is in its forward: only "b" is dropped
    gate.set()
    assert running.result(timeout=60).embedding.shape == (384,)
    with pytest.raises(Cancelled):
        queued[0].result(timeout=60)
    assert queued[1].result(timeout=60).embedding.shape == (384,)
    b.stop()


@pytest.fixture
def two_threads():
    """torch's threads pinned to 2 for the test: a test before it in this process may
    have left 1 (test_host.py's in-process model sets Settings.torch_threads=1), and the
    batcher then runs one stream whatever it is asked (a CI run failed so: the barrier
    below timed out)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: one stream")
def test_streams_run_forwards_at_once_each_on_its_share_of_the_threads(two_threads):
    """``streams=2``: two batcher threads, each running a forward of its own on half of
    torch's threads. Both forwards here wait at one barrier, which only two forwards
    running at the same time can pass."""
    import threading
    from types import SimpleNamespace

    both = threading.Barrier(2, timeout=30)

    class Meeting(CostOnly):
        threads: list[int] = []

        def predict(self, modality, prepared, asks, adapters=None):
            self.threads.append(torch.get_num_threads())
            both.wait()  # BrokenBarrierError (the job fails) if the other never comes
            return super().predict(modality, prepared, asks, adapters)

    total = torch.get_num_threads()
    rec = Meeting()
    b = DynamicBatcher(rec, BatcherConfig(max_batch_size=1, max_wait_ms=0, streams=2))
    futs = [b.submit("text", SimpleNamespace(tokens=3, truncated=False)) for _ in range(2)]
    assert [f.result(timeout=60).tokens for f in futs] == [3, 3]
    b.stop()
    assert rec.batches == [[3], [3]]
    assert rec.threads == [total // 2] * 2
    assert torch.get_num_threads() == total  # the caller's own threads are its own
    assert not any(t.is_alive() for t in b._threads)
    assert b.metrics.summary()["jobs"] == 2


def test_streams_share_out_every_thread():
    """Threads that do not divide by the streams are not left idle: 3 threads and 2
    streams run their forwards on 2 and 1 (3 // 2 each left one thread unused). Both
    forwards meet at a barrier, so each stream records its own share."""
    import threading
    from types import SimpleNamespace

    both = threading.Barrier(2, timeout=30)

    class Meeting(CostOnly):
        threads: list[int] = []

        def predict(self, modality, prepared, asks, adapters=None):
            self.threads.append(torch.get_num_threads())
            both.wait()
            return super().predict(modality, prepared, asks, adapters)

    total = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        rec = Meeting()
        b = DynamicBatcher(rec, BatcherConfig(max_batch_size=1, max_wait_ms=0, streams=2))
        futs = [b.submit("text", SimpleNamespace(tokens=3, truncated=False)) for _ in range(2)]
        assert [f.result(timeout=60).tokens for f in futs] == [3, 3]
        b.stop()
        assert sorted(rec.threads) == [1, 2]
    finally:
        torch.set_num_threads(total)
