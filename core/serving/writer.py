"""Group commit: one writer thread runs the store writes of all task threads.

Two transactions per job (start, finish) cost more Python and more commits than
the model's share of a job once batching works. The writer takes whatever queued
up while its last transaction ran and writes it as one: one UPDATE ... RETURNING
for all the starts, one upsert and one UPDATE for all the finishes, one commit.
Nothing waits on a timer: under load the groups grow by themselves, at light
load a lone write goes at once. Each caller blocks on its own future, so a task
still acknowledges its message only after its prediction is committed.

If a group's transaction fails, each request is retried in a transaction of its
own, so one bad write fails alone (and a transient error reaches each task's
retry logic).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from core import store
from core.errors import brief_error, brief_traceback
from core.jobs import JobStatus
from core.serving.contracts import JobResult
from core.serving.drain import Drain
from core.store.versions import version_refs

log = logging.getLogger("mmq.worker")


# -- the writes it takes -----------------------------------------------------------------


@dataclass(frozen=True)
class StartOp:
    """Mark the job running under ``worker`` and read its input -> a ``StartResult``."""

    job_id: str
    worker: str


@dataclass(frozen=True)
class FinishOp:
    """Store the prediction and mark the job succeeded, fenced by ``attempt`` -> True,
    or False when the outcome was late and dropped."""

    job_id: str
    attempt: int  # the fencing token of the start that ran it
    model_version: str  # the exact version the prediction came from
    result: JobResult


@dataclass(frozen=True)
class FailOp:
    """Mark the job failed (or cancelled past its deadline), fenced like ``FinishOp``
    -> True, or False when the outcome was late and dropped."""

    job_id: str
    attempt: int
    error: str
    status: JobStatus = JobStatus.FAILED


@dataclass(frozen=True)
class StartManyOp:
    """``StartOp`` for a message's jobs at once (core/serving/stages.py ``BatchRun``):
    one pending write instead of one per job -> a ``StartResult`` per job, in order."""

    job_ids: tuple[str, ...]
    worker: str


@dataclass(frozen=True)
class FinishManyOp:
    """``FinishOp`` for a message's results at once -> True/False per op, in order."""

    ops: tuple[FinishOp, ...]


@dataclass(frozen=True)
class CallOp:
    """Any other write: ``fn(session)`` -> what it returns."""

    fn: Callable[[Session], Any]


WriteOp = StartOp | StartManyOp | FinishOp | FinishManyOp | FailOp | CallOp


# -- what a start answers ----------------------------------------------------------------


@dataclass(frozen=True)
class VersionFile:
    """A started job's model version as the store has it (the host makes an AdapterRef)."""

    name: str
    modality: str
    adapter_file: str
    sha256: str


@dataclass(frozen=True)
class Started:
    """The job is running under this start: ``attempt`` is its fencing token."""

    job: Any  # the started row (store.RUN_COLUMNS, attribute access like a Job)
    payload: str | bytes  # the text, or the image/audio bytes
    # The job's model version, resolved by the UPDATE that started it; None for
    # ``base``, or for a version since removed (the host fails that job).
    version: VersionFile | None

    @property
    def attempt(self) -> int:
        return self.job.attempts


@dataclass(frozen=True)
class NotStarted:
    """The job must not run: cancelled, already done, or unknown (no row)."""

    status: str  # its current status, or "unknown"


StartResult = Started | NotStarted


@dataclass
class _Pending:
    op: WriteOp
    future: Future = field(default_factory=Future)


# -- the bulk writes, one per kind of op, each in the group's transaction ----------------


def _start_many(s: Session, jobs: list[tuple[str, str]],
                lease: timedelta) -> list[StartResult]:
    """Start (job id, worker) pairs: one UPDATE per worker -> a result per pair."""
    started: dict = {}
    for worker in dict.fromkeys(w for _, w in jobs):
        started |= store.start_jobs(session=s, job_ids=[j for j, w in jobs if w == worker],
                                    worker=worker, lease=lease)
    refs = {v.name: VersionFile(v.name, v.modality, v.adapter_file, v.adapter_sha256)
            for v in version_refs(session=s,
                                  names=[j.model_version for j in started.values()]).values()
            }
    out: list[StartResult] = []
    for job_id, _ in jobs:
        job = started.get(job_id)
        if job is None:  # cancelled, already done, or unknown: nothing to run
            current = store.job_statuses(session=s, job_ids=[job_id]).get(job_id)
            out.append(NotStarted(current or "unknown"))
        elif job.modality == "text":
            out.append(Started(job, job.text, refs.get(job.model_version)))
        else:
            out.append(Started(job, store.get_blob(session=s, sha256=job.payload_sha256),
                               refs.get(job.model_version)))
    return out


def _start_batches(s: Session, ops: list[StartManyOp], lease: timedelta) -> list:
    results = _start_many(s, [(j, op.worker) for op in ops for j in op.job_ids], lease)
    return _split(results, [len(op.job_ids) for op in ops])


def _finish_many(s: Session, ops: list[FinishOp]) -> list[bool]:
    # A job twice in one group (two attempts of it on this worker: a redelivered
    # message started it again) goes in rounds, one op per job each, so that each op
    # is fenced by its own attempt, not by whichever came last.
    rounds: list[dict[str, int]] = []  # job id -> the op's index, per round
    for i, op in enumerate(ops):
        free = next((r for r in rounds if op.job_id not in r), None)
        if free is None:
            rounds.append(free := {})
        free[op.job_id] = i
    ok = [False] * len(ops)
    for r in rounds:
        mine = [ops[i] for i in r.values()]
        for version in dict.fromkeys(op.model_version for op in mine):
            same = [op for op in mine if op.model_version == version]
            recorded = store.finish_jobs(session=s, model_version=version,
                                         results={op.job_id: op.result for op in same},
                                         attempts={op.job_id: op.attempt for op in same})
            for op in same:
                ok[r[op.job_id]] = op.job_id in recorded
    return ok


def _finish_batches(s: Session, ops: list[FinishManyOp]) -> list:
    return _split(_finish_many(s, [f for op in ops for f in op.ops]),
                  [len(op.ops) for op in ops])


def _split(answers: list, sizes: list[int]) -> list[list]:
    """A flat list of answers -> one list per op, ``sizes`` long each."""
    out, at = [], 0
    for n in sizes:
        out.append(answers[at:at + n])
        at += n
    return out


def _fail_each(s: Session, ops: list[FailOp]) -> list[bool]:
    return [store.fail_job(session=s, job_id=op.job_id, error=op.error, attempt=op.attempt,
                           status=op.status) for op in ops]


def _call_each(s: Session, ops: list[CallOp]) -> list:
    return [op.fn(s) for op in ops]


class GroupWriter:
    def __init__(self, sessions: sessionmaker[Session],
                 write_lock: threading.Lock | None = None,
                 lease: timedelta = store.DEFAULT_LEASE):
        self.sessions = sessions
        self._bulk: dict[type, Callable[[Session, list], list]] = {
            # Which running jobs a start may take over: those whose worker's lease is dead.
            StartOp: lambda s, ops: _start_many(s, [(op.job_id, op.worker) for op in ops],
                                                lease),
            StartManyOp: lambda s, ops: _start_batches(s, ops, lease),
            FinishOp: _finish_many, FinishManyOp: _finish_batches, FailOp: _fail_each,
            CallOp: _call_each}
        # Other writers in this process (the failure signal handler) take the same
        # lock on SQLite, which has one writer at a time.
        self.write_lock = write_lock
        self._queue: Drain[_Pending] = Drain()
        threading.Thread(target=self._loop, name="mmq-writer", daemon=True).start()

    def start(self, job_id: str, worker: str) -> Future[StartResult]:
        return self.submit(StartOp(job_id, worker))

    def start_many(self, job_ids: list[str], worker: str) -> Future[list[StartResult]]:
        return self.submit(StartManyOp(tuple(job_ids), worker))

    def finish_many(self, ops: list[FinishOp]) -> Future[list[bool]]:
        return self.submit(FinishManyOp(tuple(ops)))

    def finish(self, job_id: str, attempt: int, model_version: str,
               result: JobResult) -> Future[bool]:
        return self.submit(FinishOp(job_id, attempt, model_version, result))

    def fail(self, job_id: str, attempt: int, error: str,
             status: JobStatus = JobStatus.FAILED) -> Future[bool]:
        return self.submit(FailOp(job_id, attempt, error, status))

    def call(self, fn: Callable[[Session], Any]) -> Future:
        return self.submit(CallOp(fn))

    def submit(self, op: WriteOp) -> Future:
        """Queue ``op`` for the next group's transaction -> a future of its answer,
        resolved once that transaction has committed."""
        pending = _Pending(op)
        self._queue.put(pending)
        return pending.future

    def _loop(self) -> None:
        while True:
            group = self._queue.take()
            try:
                self._write(group)
            except Exception as e:  # noqa: BLE001  (retry alone: one bad request fails alone)
                if len(group) > 1:
                    # One line: SQLAlchemy's message holds the whole statement (a group's
                    # fenced finishes: tens of KB, other jobs' predictions); each write's
                    # own error reaches its task in full below, the traceback (cut the
                    # same way) only at debug level.
                    log.warning("group commit of %d writes failed (%s); writing each alone",
                                len(group), brief_error(e))
                    log.debug("the group's error:\n%s", brief_traceback(e))
                for pending in group:
                    try:
                        self._write([pending])
                    except Exception as e:  # noqa: BLE001  (the task decides: retry or fail)
                        pending.future.set_exception(e)

    def _write(self, group: list[_Pending]) -> None:
        by_kind: dict[type, list[_Pending]] = {}
        for pending in group:
            by_kind.setdefault(type(pending.op), []).append(pending)
        answers: list[tuple[_Pending, object]] = []
        with self.write_lock or nullcontext(), self.sessions.begin() as s:
            for kind, ps in by_kind.items():
                answers += zip(ps, self._bulk[kind](s, [p.op for p in ps]), strict=True)
        # Only now: the transaction is committed. The futures' callbacks hand each job
        # on (to the model pipe, the task thread): one wake-up per drain for the group.
        with Drain.deferred():
            for pending, value in answers:
                pending.future.set_result(value)
