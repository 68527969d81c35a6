"""A job's stages on the host: start -> prepare -> forward -> record.

  start    the group-commit writer (core/serving/writer.py) marks it running under
           a new attempt (the fencing token) and reads its input  -> ``StartResult``
  prepare  the started row becomes a request for the model        -> ``JobRequest``
  forward  the model backend tokenises or decodes it, batches it and runs it (in a
           spawned child process, core/serving/modelproc.py: the forward then does
           not share a GIL with Celery)                            -> ``JobResult``
  record   the writer stores the outcome, fenced by the attempt    -> recorded or late

``JobRun`` takes one job through them (a ``run_job`` message); ``BatchRun`` takes a
``run_jobs`` message's jobs through them together: one start op, one hand-over to the
model, one record op per group of results the model sends back together. Each stage
is started by the previous one's completion (in the writer's or the model receiver's
thread), not by the task thread, which waits once per job, or once per message.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import TYPE_CHECKING, Any

from core.errors import InvalidInput
from core.jobs import JobStatus
from core.serving.contracts import Cancelled, DeadlineExceeded, JobRequest, JobResult
from core.serving.drain import Drain
from core.serving.writer import FinishOp, NotStarted, Started, StartResult

if TYPE_CHECKING:
    from core.serving.host import ModelHost


class JobFuture(Future):
    """A job's outcome, as the task waits for it; ``attempt`` is the fencing token of
    this start once the store has started it (None before, or if it never started),
    so that a failure the task records is fenced like any other outcome."""

    attempt: int | None = None


class Refused(Exception):
    """The prepare stage's answer for a job that must not reach the model."""

    def __init__(self, error: str, status: JobStatus):
        super().__init__(error)
        self.error, self.status = error, status


class JobRun:
    """One job through the stages. Each wake-up of the task thread is a few context
    switches and GIL hand-offs, a tenth of the worker's CPU per job at load
    (bench/e2e.py): hence the chain of callbacks. Whatever a stage raises fails
    ``done``: no task is left waiting."""

    def __init__(self, host: ModelHost, job_id: str, worker: str,
                 done: JobFuture | None = None):
        self.host, self.job_id, self.worker = host, job_id, worker
        self.done = JobFuture() if done is None else done
        self.modality = ""  # known once started
        self.attempt = 0  # the fencing token, once started

    def start(self) -> JobFuture:
        _then(self.host.writer.start(self.job_id, self.worker), self.done, self.prepare)
        return self.done

    def prepare(self, start: StartResult) -> None:
        if isinstance(start, NotStarted):  # cancelled, already done, or unknown (no row)
            self.done.set_result({"job": self.job_id, "status": start.status})
            return
        self.attempt = self.done.attempt = start.attempt
        self.modality = start.job.modality
        self.host.track(self.done, self.job_id, self.attempt)
        try:
            request = self.host.request(start)
        except Refused as r:
            self.record_failure(r.error, r.status)
            return
        _then(self.host.model.submit(request), self.done,
              partial(self.record, exact_version(self.host, request)),
              on_error=self.ran_badly)

    def record(self, exact: str, result: JobResult) -> None:
        _then(self.host.writer.finish(self.job_id, self.attempt, exact, result), self.done,
              partial(self.recorded, partial(summary, self.job_id, self.modality, result,
                                             exact), "result"))

    def ran_badly(self, e: BaseException) -> None:
        _ran_badly(self.host, self.done, self.job_id, self.modality, self.attempt, e)

    def record_failure(self, error: str, status: JobStatus) -> None:
        _record_failure(self.host, self.done, self.job_id, self.modality, self.attempt,
                        error, status)

    def recorded(self, summarise: Callable[[], dict], what: str, ok: bool) -> None:
        """The record stage's answer: the task's summary, or the late outcome dropped."""
        self.done.set_result(summarise() if ok else
                             self.host.late(self.job_id, self.modality, self.attempt, what))


class BatchRun:
    """A message's jobs through the stages together: one start op for all of them, one
    hand-over to the model (one pipe message), and one record op for the results that
    the model sends back together (usually all of the message's: its jobs share a
    forward). Per job, a ``JobRun`` cost four futures and as many callbacks and writer
    items (bench/queue_profile.py). Each job keeps its own outcome future (the task
    waits on them in turn, and retries a job alone); whatever goes wrong with one job
    (a refusal, a bad row, a model error) ends that job alone, recorded as ``JobRun``
    records it."""

    def __init__(self, host: ModelHost, job_ids: list[str], worker: str):
        self.host, self.worker = host, worker
        self.done = {j: JobFuture() for j in dict.fromkeys(job_ids)}
        self.modality = ""  # known once started
        self._lock = threading.Lock()  # the model's callbacks come from several threads
        self._results: list[tuple[FinishOp, Callable[[], dict]]] = []

    def start(self) -> dict[str, JobFuture]:
        """-> each job's outcome future. If the start itself fails (the store is down),
        every job's future fails with that error and the task retries them one by one."""
        started = self.host.writer.start_many(list(self.done), self.worker)
        started.add_done_callback(self._started)
        return self.done

    def _started(self, f: Future) -> None:
        if f.exception() is not None:
            # One job at a time, as ``JobRun`` runs it: a row that breaks the start then
            # fails alone, and an outage fails each job for the task to retry.
            for job_id, done in self.done.items():
                JobRun(self.host, job_id, self.worker, done).start()
            return
        try:
            self.prepare(f.result())
        except BaseException as e:  # noqa: BLE001  (handed to the waiting task)
            _fail_open(self.done.values(), e)

    def prepare(self, starts: list[StartResult]) -> None:
        started: list[tuple[str, JobFuture, Started]] = []
        for (job_id, done), start in zip(self.done.items(), starts, strict=True):
            if isinstance(start, NotStarted):  # cancelled, already done, or unknown
                done.set_result({"job": job_id, "status": start.status})
                continue
            # Every started job's token first: whatever fails below is fenced by it.
            done.attempt = start.attempt
            self.modality = start.job.modality
            started.append((job_id, done, start))
        requests: list[JobRequest] = []
        for job_id, done, start in started:
            try:
                self.host.track(done, job_id, start.attempt)
                requests.append(self.host.request(start))
            except Refused as r:
                _record_failure(self.host, done, job_id, self.modality, start.attempt,
                                r.error, r.status)
            except Exception as e:  # noqa: BLE001  (this job's fault: the task records it)
                done.set_exception(e)
        if not requests:
            return
        try:
            futs = self.host.model.submit_many(requests)
        except Exception as e:  # noqa: BLE001  (the task records or retries each)
            _fail_open([self.done[r.job_id] for r in requests], e)
            return
        for request, fut in zip(requests, futs, strict=True):
            fut.add_done_callback(partial(self._ran, request))

    def _ran(self, request: JobRequest, fut: Future) -> None:
        """One job's answer from the model: a result waits for the others that come back
        with it (the thread that resolves them records them together on leaving
        ``Drain.deferred``); anything else ends that job."""
        try:
            done = self.done[request.job_id]
            if (e := fut.exception()) is not None:
                _ran_badly(self.host, done, request.job_id, self.modality, request.attempt,
                           e)
                return
            exact = exact_version(self.host, request)
            result: JobResult = fut.result()
            op = FinishOp(request.job_id, request.attempt, exact, result)
            with self._lock:
                self._results.append((op, partial(summary, request.job_id, self.modality,
                                                  result, exact)))
                first = len(self._results) == 1
            if first:
                Drain.after(self._flush)
        except BaseException as e:  # noqa: BLE001  (handed to the waiting task)
            _fail_open([self.done[request.job_id]], e)

    def _flush(self) -> None:
        with self._lock:
            results, self._results = self._results, []
        try:
            if results:
                self.record(results)
        except BaseException as e:  # noqa: BLE001  (handed to the waiting task)
            _fail_open([self.done[op.job_id] for op, _ in results], e)

    def record(self, results: list[tuple[FinishOp, Callable[[], dict]]]) -> None:
        def recorded(f: Future) -> None:
            if f.exception() is not None:
                # One by one, so that a result that cannot be written fails alone (and
                # an outage fails each job for the task to retry).
                for op, summarise in results:
                    _then(self.host.writer.finish(op.job_id, op.attempt, op.model_version,
                                                  op.result), self.done[op.job_id],
                          partial(self._recorded, op, summarise))
                return
            for (op, summarise), ok in zip(results, f.result(), strict=True):
                try:
                    self._recorded(op, summarise, ok)
                except BaseException as e:  # noqa: BLE001  (handed to the waiting task)
                    if not self.done[op.job_id].done():
                        self.done[op.job_id].set_exception(e)

        self.host.writer.finish_many([op for op, _ in results]).add_done_callback(recorded)

    def _recorded(self, op: FinishOp, summarise: Callable[[], dict], ok: bool) -> None:
        self.done[op.job_id].set_result(summarise() if ok else self.host.late(
            op.job_id, self.modality, op.attempt, "result"))


def exact_version(host: ModelHost, request: JobRequest) -> str:
    """The exact version a prediction comes from: the adapter's name and weights, or
    the pretrained towers' own version string."""
    return host.model.version if request.adapter is None else request.adapter.exact


def _ran_badly(host: ModelHost, done: JobFuture, job_id: str, modality: str, attempt: int,
               e: BaseException) -> None:
    if isinstance(e, Cancelled):  # the row says so already: nothing to write
        done.set_result({"job": job_id, "modality": modality, "status": "cancelled"})
    elif isinstance(e, DeadlineExceeded):
        _record_failure(host, done, job_id, modality, attempt, str(e), JobStatus.CANCELLED)
    elif isinstance(e, InvalidInput):
        _record_failure(host, done, job_id, modality, attempt, str(e.reason),
                        JobStatus.FAILED)
    else:
        done.set_exception(e)


def _record_failure(host: ModelHost, done: JobFuture, job_id: str, modality: str,
                    attempt: int, error: str, status: JobStatus) -> None:
    def recorded(ok: bool) -> None:
        done.set_result({"job": job_id, "modality": modality, "status": status.value,
                         "error": error} if ok else
                        host.late(job_id, modality, attempt, status.value))

    _then(host.writer.fail(job_id, attempt, error, status), done, recorded)


def _fail_open(futures, e: BaseException) -> None:
    """Fail those of ``futures`` not yet resolved with ``e``."""
    for fut in futures:
        if not fut.done():
            fut.set_exception(e)


def _then(fut: Future, done: Future, fn: Callable[[Any], None],
          on_error: Callable[[BaseException], None] | None = None) -> None:
    """When ``fut`` completes: ``fn(result)``, or ``on_error(exc)`` (default: fail
    ``done``). Whatever ``fn`` raises fails ``done``: no job is left waiting."""
    def step(f: Future) -> None:
        try:
            e = f.exception()
            if e is None:
                fn(f.result())
            elif on_error is not None:
                on_error(e)
            else:
                done.set_exception(e)
        except BaseException as e:  # noqa: BLE001  (handed to the waiting task)
            if not done.done():
                done.set_exception(e)

    fut.add_done_callback(step)


def summary(job_id: str, modality: str, result: JobResult, version: str) -> dict:
    """What Flower shows as the task's result: enough to find the job in the store."""
    out = {"job": job_id, "modality": modality, "status": "succeeded",
           "model_version": version}
    if result.labels:
        out["top"] = list(result.labels[0])
    if result.text is not None:  # audio: the start of the transcript, for the task list
        out["text"] = result.text if len(result.text) <= 80 else result.text[:77] + "..."
    if not result.labels and result.text is None:
        out["embedding_dim"] = len(result.embedding)
    return out
