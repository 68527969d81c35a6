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

import itertools
import logging
import multiprocessing as mp
import os
import signal
import threading
from concurrent.futures import Future

from core.config import Settings
from core.errors import InvalidInput
from core.serving.batcher import BatcherConfig, DynamicBatcher
from core.serving.contracts import Failure, JobRequest, JobResult
from core.serving.metrics import BatchMetrics
from core.serving.procs import limit_malloc_arenas

log = logging.getLogger("mmq.worker")

# On the wire (pickled by the pipe): parent -> child lists of (request id,
# JobRequest); child -> parent (results, batch observations, drops), each result
# (request id, JobResult | Failure). A Failure rebuilds the same exception type,
# with an InvalidInput's kind and index, on the parent's side.


def _outcome(fut: Future) -> JobResult | Failure:
    e = fut.exception()
    return fut.result() if e is None else Failure.of(e)


class _Outbox:
    """What the child owes the parent: results and metric observations, sent together
    by one sender thread whenever a batch (or a message of bad inputs) is done."""

    def __init__(self, conn):
        self.conn = conn
        self.results: list[tuple[int, JobResult | Failure]] = []
        self.batches: list[dict] = []
        self.drops: list[tuple[str, int]] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._send_forever, name="mmq-child-send", daemon=True).start()

    def add(self, rid: int, fut: Future) -> None:
        outcome = _outcome(fut)
        with self._cv:
            self.results.append((rid, outcome))

    # BatchMetrics sink: observations travel with the results of the same batch.
    def observe_batch(self, **obs) -> None:
        with self._cv:
            self.batches.append(obs)

    def observe_dropped(self, modality: str, n: int) -> None:
        with self._cv:
            self.drops.append((modality, n))

    def flush(self) -> None:
        with self._cv:
            self._cv.notify()

    def _send_forever(self) -> None:
        while True:
            with self._cv:
                while not (self.results or self.batches or self.drops):
                    self._cv.wait()
                msg = (self.results, self.batches, self.drops)
                self.results, self.batches, self.drops = [], [], []
            self.conn.send(msg)


def _child_main(settings: Settings, device: str | None, conn) -> None:
    """Entry point of the spawned child: load, say ready, serve until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent decides when to stop
    limit_malloc_arenas()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s[model]: %(message)s")
    try:
        from core.model.adapters import AdapterCache
        from core.model.multimodal import MultimodalModel

        model = MultimodalModel.load(device=device, settings=settings)
        cfg = BatcherConfig.for_device(model.device, settings)
    except BaseException as e:  # noqa: BLE001  (the parent logs it and exits)
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    outbox = _Outbox(conn)
    batcher = DynamicBatcher(model, cfg, BatchMetrics(sinks=[outbox]), after_batch=outbox.flush,
                             adapters=AdapterCache(settings.adapter_cache_size))
    conn.send(("ready", {"version": model.version, "device": str(model.device), "cfg": cfg,
                         "modalities": model.modalities}))
    try:
        while True:
            reqs, cancels = _receive(conn)
            _accept(model, batcher, outbox, reqs)
            if cancels:  # after _accept: a cancel may name a job of the same message
                batcher.cancel(cancels)
    except (EOFError, OSError):  # the parent is gone: nobody is waiting for results
        os._exit(0)


def _receive(conn) -> tuple[list[tuple[int, JobRequest]], set[str]]:
    """One message, and whatever else is waiting (it joins this tokenizer call):
    -> (requests, job ids to cancel). A message is ("submit", [(rid, JobRequest)])
    or ("cancel", [job id])."""
    reqs: list[tuple[int, JobRequest]] = []
    cancels: set[str] = set()
    while True:
        kind, body = conn.recv()
        if kind == "cancel":
            cancels.update(body)
        else:
            reqs += body
        if not conn.poll():
            return reqs, cancels


def _accept(model, batcher: DynamicBatcher, outbox: _Outbox,
            reqs: list[tuple[int, JobRequest]]) -> None:
    """Prepare each modality's requests in one call and hand the valid ones to the
    batcher; a bad item is answered at once and fails alone."""
    by_modality: dict[str, list[tuple[int, JobRequest]]] = {}
    for rid, req in reqs:
        by_modality.setdefault(req.modality, []).append((rid, req))
    bad = False
    for modality, rs in by_modality.items():
        try:
            prepared = model.prepare_many(modality, [req.payload for _, req in rs])
        except ValueError as e:  # an unknown modality: these requests are bad input
            prepared = [InvalidInput(str(e))] * len(rs)
        except Exception as e:  # noqa: BLE001  (a fault, not the input: an internal error)
            log.exception("preparing %d %s item(s) failed", len(rs), modality)
            prepared = [e] * len(rs)
        for (rid, req), p in zip(rs, prepared, strict=True):
            if isinstance(p, Exception):
                f: Future = Future()
                f.set_exception(p)
                outbox.add(rid, f)
                bad = True
                continue
            fut = batcher.submit(modality, p, labels=req.labels, top_k=req.top_k,
                                 deadline=req.deadline, adapter=req.adapter, key=req.job_id)
            fut.add_done_callback(lambda f, rid=rid: outbox.add(rid, f))
    if bad:
        outbox.flush()


class ModelProcess:
    """Parent side: ``submit`` from any task thread -> a future of a ``JobResult``,
    as ``DynamicBatcher.submit`` gives."""

    def __init__(self, settings: Settings, device: str | None, metrics: BatchMetrics):
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(settings, device, child_conn),
                                 name="mmq-model", daemon=True)
        self._proc.start()
        child_conn.close()
        kind, info = self._conn.recv()
        if kind != "ready":
            self._proc.join(10)
            raise RuntimeError(f"the model process failed to start: {info}")
        self.version: str = info["version"]
        self.device: str = info["device"]
        self.cfg: BatcherConfig = info["cfg"]
        self.modalities: tuple[str, ...] = info["modalities"]
        self.metrics = metrics
        self._ids = itertools.count()
        self._futures: dict[int, Future] = {}
        self._outgoing: list[tuple[int, JobRequest]] = []
        self._cancels: list[str] = []
        self._cv = threading.Condition()
        self._closing = False
        threading.Thread(target=self._send_forever, name="mmq-model-send", daemon=True).start()
        threading.Thread(target=self._receive_forever, name="mmq-model-recv",
                         daemon=True).start()

    def submit(self, request: JobRequest) -> Future:
        fut: Future = Future()
        with self._cv:
            rid = next(self._ids)
            self._futures[rid] = fut
            self._outgoing.append((rid, request))
            self._cv.notify()
        return fut

    def cancel(self, job_ids: list[str]) -> None:
        with self._cv:
            self._cancels += job_ids
            self._cv.notify()

    def close(self) -> None:
        self._closing = True
        self._proc.terminate()
        self._proc.join(10)

    def _send_forever(self) -> None:
        while True:
            with self._cv:
                while not self._outgoing and not self._cancels:
                    self._cv.wait()
                reqs, self._outgoing = self._outgoing, []
                cancels, self._cancels = self._cancels, []
            try:
                if reqs:
                    self._conn.send(("submit", reqs))
                if cancels:  # after the submits: the child applies it to those too
                    self._conn.send(("cancel", cancels))
            except OSError:
                return  # the receiver notices the dead child and exits the worker

    def _receive_forever(self) -> None:
        try:
            while True:
                results, batches, drops = self._conn.recv()
                self._resolve(results)
                for obs in batches:
                    self.metrics.observe_batch(**obs)
                for modality, n in drops:
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

    def _resolve(self, results: list[tuple[int, JobResult | Failure]]) -> None:
        with self._cv:
            futs = [self._futures.pop(rid) for rid, _ in results]
        for fut, (_, outcome) in zip(futs, results, strict=True):
            if isinstance(outcome, Failure):
                fut.set_exception(outcome.exception())
            else:
                fut.set_result(outcome)
