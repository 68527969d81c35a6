"""The dynamic batcher: its threads (streams) run the model; task threads hand it jobs.

Task threads validate and preprocess their own item (tokenise, decode, log-mel:
CPU work that needs no model weights), then ``submit`` it and wait on a future.
The batcher thread closes a batch when the token budget is full, when
``max_batch_size`` items are in it, or when the oldest item has waited
``max_wait_ms``, whichever comes first; items that arrive while a forward runs
are batched the moment it ends, without waiting. Items past their deadline are
dropped when a batch forms. A batch that fails as a whole (out of memory, say)
is split in halves and retried before any item is failed.

``cfg.streams`` batcher threads take batches from the same queues, each running its
own forward on its share of torch's intra-op threads (on 2 cores: two forwards
of one thread each, not one forward of two). On an idle machine the two ways run
equally fast; beside the worker, Redis and producers they do not: every op of a
2-thread forward ends at a barrier where it waits for whichever of its threads the
others preempted, so each millisecond they take costs the forward about two, and a
1-thread forward loses only its own (bench/streams.py, bench/queue_profile.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from core.model.adapters import AdapterCache
from core.serving.contracts import (
    AdapterRef,
    BatcherConfig,
    Cancelled,
    DeadlineExceeded,
    JobResult,
)
from core.serving.drain import Drain
from core.serving.metrics import BatchMetrics

__all__ = ["BatcherConfig", "DeadlineExceeded", "DynamicBatcher"]

log = logging.getLogger(__name__)


@dataclass
class _Item:
    modality: str
    prepared: object  # core.model.Prepared
    labels: list[str] | None
    top_k: int
    deadline: float | None  # time.monotonic() seconds
    adapter: AdapterRef | None = None  # the job's model version; None = the base tower
    key: str | None = None  # the job id, so that a cancel can find it
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    def __init__(self, model, cfg: BatcherConfig, metrics: BatchMetrics | None = None,
                 after_batch=None, adapters: AdapterCache | None = None):
        self.model = model
        self.cfg = cfg
        self.adapters = adapters or AdapterCache()
        self.metrics = metrics or BatchMetrics()
        # Called by the batcher thread once a batch's futures are all resolved (a
        # child process then sends the batch's results in one message, not one each).
        self.after_batch = after_batch
        self._pending: dict[str, deque[_Item]] = {}
        self._cv = threading.Condition()
        self._observed = threading.Lock()  # the metrics' histograms: one stream at a time
        self._stop = False
        # No more streams than torch has threads to share out (one core: one stream).
        total = torch.get_num_threads()
        n = max(1, min(cfg.streams, total))
        # Every thread is someone's: 3 threads and 2 streams run forwards on 2 and 1.
        shares = [total // n + (i < total % n) for i in range(n)] if n > 1 else [None]
        self._threads = [threading.Thread(target=self._loop, args=(share,),
                                          name=f"mmq-batcher-{i}", daemon=True)
                         for i, share in enumerate(shares)]
        for t in self._threads:
            t.start()

    # -- task-thread side ---------------------------------------------------------------

    def submit(self, modality: str, prepared, *, labels: list[str] | None = None,
               top_k: int = 5, deadline: float | None = None,
               adapter: AdapterRef | None = None, key: str | None = None) -> Future:
        """Queue one prepared item; the future resolves to a ``JobResult``. Items of
        every model version of a modality share batches (``_forward``)."""
        item = _Item(modality, prepared, labels, top_k, deadline, adapter, key)
        with self._cv:
            if self._stop:
                raise RuntimeError("the batcher is stopped")
            self._pending.setdefault(modality, deque()).append(item)
            self._cv.notify()
        return item.future

    def cancel(self, keys: set[str]) -> int:
        """Drop the queued items with these keys (their futures raise ``Cancelled``);
        items already in a forward are not interrupted. -> how many were dropped."""
        dropped: list[_Item] = []
        with self._cv:
            for modality, q in self._pending.items():
                keep = deque(it for it in q if it.key not in keys)
                dropped += [it for it in q if it.key in keys]
                self._pending[modality] = keep
        for it in dropped:
            it.future.set_exception(Cancelled("cancelled before its batch ran"))
        return len(dropped)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))

    # -- batcher thread -----------------------------------------------------------------

    def _loop(self, threads: int | None) -> None:
        if threads is not None:
            # This thread's own OpenMP team size (torch's setting is per calling thread
            # under OpenMP; it also becomes the default of threads that start later).
            # torch sets a thread's team size lazily, from that last value, the first
            # time the thread asks for it: done first here, or it would undo this
            # thread's share with whatever another stream set last (2 and 1 -> 1 and 1).
            torch.get_num_threads()
            torch.set_num_threads(threads)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)
            if self.after_batch is not None:
                self.after_batch()

    def _ready(self, q: deque[_Item]) -> bool:
        tokens = 0
        budget = self.cfg.budget(q[0].modality)
        for n, it in enumerate(q, 1):
            tokens += it.prepared.tokens
            if n >= self.cfg.max_batch_size or tokens >= budget:
                return True
        return False

    def _next_batch(self) -> list[_Item] | None:
        with self._cv:
            while True:
                if self._stop and not any(self._pending.values()):
                    return None
                queues = [q for q in self._pending.values() if q]
                if not queues:
                    self._cv.wait()
                    continue
                # Oldest head first across modalities, so none starves.
                q = min(queues, key=lambda d: d[0].enqueued)
                waited = time.monotonic() - q[0].enqueued
                if self._ready(q) or waited * 1e3 >= self.cfg.max_wait_ms or self._stop:
                    return self._take(q)
                self._cv.wait(self.cfg.max_wait_ms / 1e3 - waited)

    def _take(self, q: deque[_Item]) -> list[_Item]:
        batch: list[_Item] = []
        tokens = 0
        budget = self.cfg.budget(q[0].modality) if q else 0
        now = time.monotonic()
        while q and len(batch) < self.cfg.max_batch_size:
            it = q[0]
            if it.deadline is not None and now > it.deadline:
                q.popleft()
                it.future.set_exception(DeadlineExceeded("deadline passed before it ran"))
                self.metrics.observe_dropped(it.modality)
                continue
            if batch and tokens + it.prepared.tokens > budget:
                break
            batch.append(q.popleft())
            tokens += it.prepared.tokens
        return batch

    def _run(self, batch: list[_Item]) -> None:
        batch = self._with_adapters(batch)
        if not batch:
            return
        t0 = time.monotonic()
        try:
            results = self._forward(batch)
        except Exception as e:  # noqa: BLE001  (a batch-level failure: split and retry)
            if len(batch) == 1:
                log.exception("item failed alone in a batch of one")
                batch[0].future.set_exception(e)
                return
            log.warning("batch of %d failed (%s: %s); retrying its halves", len(batch),
                        type(e).__name__, e)
            if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(batch) // 2
            self._run(batch[:half])
            self._run(batch[half:])
            return
        done = time.monotonic()
        with self._observed:
            self.metrics.observe_batch(
                modality=batch[0].modality, size=len(batch),
                tokens=sum(it.prepared.tokens for it in batch), model_s=done - t0,
                waits_s=[t0 - it.enqueued for it in batch])
        # One wake-up of whoever the futures hand the results to, after the whole batch
        # (in the worker, BatchRun records a message's results together).
        with Drain.deferred():
            for it, r in zip(batch, results, strict=True):
                it.future.set_result(r)

    def _with_adapters(self, batch: list[_Item]) -> list[_Item]:
        """Load each version's adapter before the forward; an item whose adapter cannot
        be loaded (file missing, sha256 mismatch) fails alone, not its batch."""
        keep = []
        for it in batch:
            if it.adapter is not None:
                try:
                    self.adapters.get(it.adapter, self.model.feature_kind(it.modality))
                except Exception as e:  # noqa: BLE001  (this job's failure, with its reason)
                    log.error("model version %s: %s", it.adapter.name, e)
                    it.future.set_exception(e)
                    continue
            keep.append(it)
        return keep

    def _forward(self, batch: list[_Item]) -> list[JobResult]:
        modality, prepared = batch[0].modality, [it.prepared for it in batch]
        asks = [(it.labels, it.top_k) for it in batch]
        if all(it.adapter is None for it in batch):
            return self.model.predict(modality, prepared, asks)
        # Each job's adapter (its model version), loaded by _with_adapters; None = base.
        adapters = [None if it.adapter is None else self.adapters.get(it.adapter)
                    for it in batch]
        return self.model.predict(modality, prepared, asks, adapters=adapters)
