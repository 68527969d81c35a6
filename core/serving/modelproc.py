"""The model and its dynamic batcher in a child process of the worker.

Why a child: in one process, the forward shares the GIL with Celery's consumer
loop, the task threads and the store; torch re-acquires the GIL between ops, so
a forward took 2.5x as long in the worker as offline. In its own process the
forward runs at offline speed while the parent does Celery and SQL.

The child is *spawned* (a fresh interpreter): nothing forks after torch or CUDA
are initialised. Task threads in the parent call ``submit`` with the raw input;
one sender thread ships what queued up as one message. The child tokenises or
decodes each message's items together (the fast tokenizer's batch call costs
far less per item), feeds its ``DynamicBatcher``, and sends each batch's results
with the batch's metric observations in one message; a receiver thread in the
parent resolves the futures and replays the observations into the parent's
``BatchMetrics`` (the periodic log line and the Prometheus exporter).

If the child dies, the parent exits at once: its unacknowledged messages are
redelivered (``acks_late``), and nothing is marked failed that did not fail.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from core.config import Settings
from core.errors import InvalidInput
from core.serving.contracts import BatcherConfig, Failure, JobRequest, JobResult
from core.serving.drain import Drain
from core.serving.metrics import BatchMetrics
from core.serving.procs import (
    keep_freed_memory,
    limit_malloc_arenas,
    settle_gc,
    short_gil_turns,
)

if TYPE_CHECKING:  # the parent never imports torch: only the child runs the batcher
    from core.serving.batcher import DynamicBatcher

log = logging.getLogger("mmq.worker")


# -- on the wire (pickled by the pipe) ----------------------------------------------------
# Each request and each outcome names its job and the attempt (fencing token) that runs
# it: (job id, attempt) is unique among a worker's jobs in flight, since every start of
# a job counts one more attempt. A Failure rebuilds the same exception type, with an
# InvalidInput's kind and index, on the parent's side.


@dataclass(frozen=True)
class Ready:
    """child -> parent, once: the model is loaded."""

    version: str
    device: str
    cfg: BatcherConfig
    modalities: tuple[str, ...]


@dataclass(frozen=True)
class StartFailed:
    """child -> parent, instead of ``Ready``: the model could not be loaded."""

    error: str


@dataclass(frozen=True)
class Submit:
    """parent -> child: jobs to run."""

    requests: list[JobRequest]


@dataclass(frozen=True)
class Cancel:
    """parent -> child: drop these jobs from batches that have not started."""

    job_ids: list[str]


class Outcome(NamedTuple):  # one per job: a tuple on the wire, the cheapest to pickle
    job_id: str
    attempt: int
    result: JobResult | Failure


class BatchObserved(NamedTuple):
    obs: dict  # BatchMetrics.observe_batch's keyword arguments


class Dropped(NamedTuple):
    modality: str
    n: int


@dataclass(frozen=True)
class Report:
    """child -> parent: a batch's outcomes, with its metric observations."""

    outcomes: list[Outcome]
    batches: list[dict]
    drops: list[Dropped]


def _outcome(req: JobRequest, fut: Future) -> Outcome:
    e = fut.exception()
    return Outcome(req.job_id, req.attempt, fut.result() if e is None else Failure.of(e))


class _Outbox:
    """What the child owes the parent: results and metric observations, sent together
    by one sender thread whenever a batch (or a message of bad inputs) is done."""

    def __init__(self, conn):
        self.conn = conn
        self._queue: Drain[Outcome | BatchObserved | Dropped] = Drain()
        threading.Thread(target=self._send_forever, name="mmq-child-send", daemon=True).start()

    def add(self, req: JobRequest, fut: Future) -> None:
        self._queue.put(_outcome(req, fut), wake=False)

    # BatchMetrics sink: observations travel with the results of the same batch.
    def observe_batch(self, **obs) -> None:
        self._queue.put(BatchObserved(obs), wake=False)

    def observe_dropped(self, modality: str, n: int) -> None:
        self._queue.put(Dropped(modality, n), wake=False)

    def flush(self) -> None:
        self._queue.wake()

    def _send_forever(self) -> None:
        while True:
            self.conn.send(_report(self._queue.take()))


def _report(items: list[Outcome | BatchObserved | Dropped]) -> Report:
    report = Report([], [], [])
    for it in items:
        if isinstance(it, Outcome):
            report.outcomes.append(it)
        elif isinstance(it, BatchObserved):
            report.batches.append(it.obs)
        else:
            report.drops.append(it)
    return report


def _child_main(settings: Settings, device: str | None, conn, modality: str = "text") -> None:
    """Entry point of the spawned child: load, say ready, serve until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent decides when to stop
    limit_malloc_arenas()
    keep_freed_memory()
    short_gil_turns()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s[model]: %(message)s")
    try:
        from core.model.adapters import AdapterCache
        from core.model.multimodal import MultimodalModel
        from core.serving.batcher import DynamicBatcher

        model = MultimodalModel.load(device=device, settings=settings)
        model.load_tower(modality)  # the worker's own tower, before it says it is ready
        cfg = BatcherConfig.for_device(model.device, settings, modality)
    except BaseException as e:  # noqa: BLE001  (the parent logs it and exits)
        conn.send(StartFailed(f"{type(e).__name__}: {e}"))
        return
    outbox = _Outbox(conn)
    batcher = DynamicBatcher(model, cfg, BatchMetrics(sinks=[outbox]), after_batch=outbox.flush,
                             adapters=AdapterCache(settings.adapter_cache_size))
    settle_gc()  # the model and the batcher are built: out of the collector's reach
    conn.send(Ready(model.version, str(model.device), cfg, model.modalities))
    try:
        while True:
            reqs, cancels = _receive(conn)
            _accept(model, batcher, outbox, reqs)
            if cancels:  # after _accept: a cancel may name a job of the same message
                batcher.cancel(cancels)
    except (EOFError, OSError):  # the parent is gone: nobody is waiting for results
        os._exit(0)


def _receive(conn) -> tuple[list[JobRequest], set[str]]:
    """One message, and whatever else is waiting (it joins this tokenizer call):
    -> (requests, job ids to cancel). A message is a ``Submit`` or a ``Cancel``."""
    reqs: list[JobRequest] = []
    cancels: set[str] = set()
    while True:
        msg: Submit | Cancel = conn.recv()
        if isinstance(msg, Cancel):
            cancels.update(msg.job_ids)
        else:
            reqs += msg.requests
        if not conn.poll():
            return reqs, cancels


def _accept(model, batcher: DynamicBatcher, outbox: _Outbox, reqs: list[JobRequest]) -> None:
    """Prepare each modality's requests in one call and hand the valid ones to the
    batcher; a bad item is answered at once and fails alone."""
    by_modality: dict[str, list[JobRequest]] = {}
    for req in reqs:
        by_modality.setdefault(req.modality, []).append(req)
    bad = False
    for modality, rs in by_modality.items():
        try:
            prepared = model.prepare_many(modality, [req.payload for req in rs])
        except ValueError as e:  # an unknown modality: these requests are bad input
            prepared = [InvalidInput(str(e))] * len(rs)
        except Exception as e:  # noqa: BLE001  (a fault, not the input: an internal error)
            log.exception("preparing %d %s item(s) failed", len(rs), modality)
            prepared = [e] * len(rs)
        for req, p in zip(rs, prepared, strict=True):
            if isinstance(p, Exception):
                f: Future = Future()
                f.set_exception(p)
                outbox.add(req, f)
                bad = True
                continue
            fut = batcher.submit(modality, p, labels=req.labels, top_k=req.top_k,
                                 deadline=req.deadline, adapter=req.adapter, key=req.job_id)
            fut.add_done_callback(lambda f, req=req: outbox.add(req, f))
    if bad:
        outbox.flush()


class ModelProcess:
    """Parent side: ``submit`` from any task thread -> a future of a ``JobResult``,
    as ``DynamicBatcher.submit`` gives."""

    def __init__(self, settings: Settings, device: str | None, metrics: BatchMetrics,
                 *, wait: bool = True, modality: str = "text"):
        """Spawn the child; with ``wait=False`` return while it loads (the worker
        migrates the store meanwhile) and call ``wait_ready`` before anything else.
        ``modality``: the worker's, which sets its batcher's streams by default."""
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main,
                                 args=(settings, device, child_conn, modality),
                                 name="mmq-model", daemon=True)
        self._proc.start()
        child_conn.close()
        self.metrics = metrics
        # (job id, attempt) -> its future: set by task threads, popped by the receiver
        # (each a single dict operation, atomic under the GIL).
        self._futures: dict[tuple[str, int], Future] = {}
        self._outgoing: Drain[JobRequest | Cancel] = Drain()
        self._closing = False
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the child has loaded the model; RuntimeError if it could not."""
        ready: Ready | StartFailed = self._conn.recv()
        if not isinstance(ready, Ready):
            self._proc.join(10)
            raise RuntimeError(f"the model process failed to start: {ready.error}")
        self.version: str = ready.version
        self.device: str = ready.device
        self.cfg: BatcherConfig = ready.cfg
        self.modalities: tuple[str, ...] = ready.modalities
        threading.Thread(target=self._send_forever, name="mmq-model-send", daemon=True).start()
        threading.Thread(target=self._receive_forever, name="mmq-model-recv",
                         daemon=True).start()

    def submit(self, request: JobRequest) -> Future:
        fut: Future = Future()
        # Registered before it is sent: its outcome may come back at once.
        running = self._futures.setdefault((request.job_id, request.attempt), fut)
        if running is not fut:
            # A second delivery of an attempt this worker already runs (its link came
            # back after the sweep re-sent the job: bench/cluster.py link-cut): it shares
            # the one run's outcome instead of failing the job.
            return running
        self._outgoing.put(request)
        return fut

    def submit_many(self, requests: list[JobRequest]) -> list[Future]:
        """``submit`` for a message's jobs: one hand-over to the sender thread."""
        futs, new = [], []
        for request in requests:
            fut: Future = Future()
            running = self._futures.setdefault((request.job_id, request.attempt), fut)
            futs.append(running)
            if running is fut:  # else a second delivery, sharing the one run (``submit``)
                new.append(request)
        self._outgoing.put_many(new)
        return futs

    def cancel(self, job_ids: list[str]) -> None:
        self._outgoing.put(Cancel(list(job_ids)))

    def close(self) -> None:
        self._closing = True
        self._proc.terminate()
        self._proc.join(10)

    def _send_forever(self) -> None:
        while True:
            items = self._outgoing.take()
            reqs = [it for it in items if isinstance(it, JobRequest)]
            cancels = [j for it in items if isinstance(it, Cancel) for j in it.job_ids]
            try:
                if reqs:
                    self._conn.send(Submit(reqs))
                if cancels:  # after the submits: the child applies it to those too
                    self._conn.send(Cancel(cancels))
            except OSError:
                return  # the receiver notices the dead child and exits the worker

    def _receive_forever(self) -> None:
        try:
            while True:
                report: Report = self._conn.recv()
                self._resolve(report.outcomes)
                for obs in report.batches:
                    self.metrics.observe_batch(**obs)
                for modality, n in report.drops:
                    self.metrics.observe_dropped(modality, n)
        except (EOFError, OSError):
            if self._closing:
                return
            self._proc.join(5)
            log.critical("the model process died (exit code %s); exiting so that this "
                         "worker's unacknowledged jobs are redelivered", self._proc.exitcode)
            logging.shutdown()
            os._exit(70)
        except BaseException:  # noqa: BLE001  (no future would resolve again: a wedged
            # worker with a live lease is worse than a dead one, whose jobs are recovered)
            log.critical("the model process receiver failed; exiting", exc_info=True)
            logging.shutdown()
            os._exit(70)

    def _resolve(self, outcomes: list[Outcome]) -> None:
        futs = [self._futures.pop((o.job_id, o.attempt)) for o in outcomes]
        # Each future's callback queues the job's outcome for the writer: one wake-up
        # of the writer for the batch (core/serving/drain.py).
        with Drain.deferred():
            for fut, o in zip(futs, outcomes, strict=True):
                if isinstance(o.result, Failure):
                    fut.set_exception(o.result.exception())
                else:
                    fut.set_result(o.result)
