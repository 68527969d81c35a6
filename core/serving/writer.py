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
from functools import partial

from core import store
from core.serving.contracts import JobResult
from core.store.versions import version_refs

log = logging.getLogger("mmq.worker")


@dataclass
class _Req:
    kind: str  # "start", "finish" or "call"
    arg: object
    future: Future = field(default_factory=Future)


@dataclass(frozen=True)
class VersionFile:
    """A started job's model version as the store has it (the host makes an AdapterRef)."""

    name: str
    modality: str
    adapter_file: str
    sha256: str


def _start_many(s, args: list[tuple[str, str]], lease: timedelta) -> list:
    """args: (job_id, worker) -> per request (job, payload, VersionFile | None) or
    (None, current status, None). The job's model version was resolved by the same
    UPDATE that started it; None for ``base`` or for a version since removed (the
    host fails that job)."""
    started: dict = {}
    for worker in dict.fromkeys(w for _, w in args):
        started |= store.start_jobs(session=s, job_ids=[j for j, w2 in args if w2 == worker],
                                    worker=worker, lease=lease)
    refs = {v.name: VersionFile(v.name, v.modality, v.adapter_file, v.adapter_sha256)
            for v in version_refs(session=s,
                                  names=[j.model_version for j in started.values()]).values()
            }
    out = []
    for job_id, _ in args:
        job = started.get(job_id)
        if job is None:  # cancelled, already done, or unknown: nothing to run
            current = store.job_statuses(session=s, job_ids=[job_id]).get(job_id)
            out.append((None, current or "unknown", None))
        elif job.modality == "text":
            out.append((job, job.text, refs.get(job.model_version)))
        else:
            out.append((job, store.get_blob(session=s, sha256=job.payload_sha256),
                        refs.get(job.model_version)))
    return out


def _finish_many(s, args: list[tuple[str, int, str, JobResult]]) -> list[bool]:
    """args: (job_id, attempt, model_version, prediction) -> per request, whether it
    was recorded (False: the attempt no longer holds the job; its outcome is dropped)."""
    recorded: set[str] = set()
    for version in dict.fromkeys(v for _, _, v, _ in args):
        mine = [(j, a, r) for j, a, v, r in args if v == version]
        recorded |= store.finish_jobs(session=s, model_version=version,
                                      results={j: r for j, _, r in mine},
                                      attempts={j: a for j, a, _ in mine})
    return [j in recorded for j, _, _, _ in args]


def _call_each(s, fns: list[Callable]) -> list:
    return [fn(s) for fn in fns]


_BULK = {"start": _start_many, "finish": _finish_many, "call": _call_each}


class GroupWriter:
    def __init__(self, sessions, write_lock: threading.Lock | None = None,
                 lease: timedelta = store.DEFAULT_LEASE):
        self.sessions = sessions
        # Which running jobs a start may take over: those whose worker's lease is dead.
        self._bulk = {**_BULK, "start": partial(_start_many, lease=lease)}
        # Other writers in this process (the failure signal handler) take the same
        # lock on SQLite, which has one writer at a time.
        self.write_lock = write_lock
        self._pending: list[_Req] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._loop, name="mmq-writer", daemon=True).start()

    def start(self, job_id: str, worker: str) -> Future:
        """-> (job, payload, VersionFile | None), or (None, status, None) when the job
        must not run."""
        return self._submit("start", (job_id, worker))

    def finish(self, job_id: str, attempt: int, model_version: str,
               result: JobResult) -> Future:
        """Store the prediction and mark the job succeeded, if ``attempt`` still holds
        it -> True, or False when the outcome was late and dropped."""
        return self._submit("finish", (job_id, attempt, model_version, result))

    def call(self, fn: Callable) -> Future:
        """Any other write: ``fn(session)``, in the next group's transaction."""
        return self._submit("call", fn)

    def _submit(self, kind: str, arg: object) -> Future:
        req = _Req(kind, arg)
        with self._cv:
            self._pending.append(req)
            self._cv.notify()
        return req.future

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
                group, self._pending = self._pending, []
            try:
                self._write(group)
            except Exception:  # noqa: BLE001  (retry alone: one bad request fails alone)
                if len(group) > 1:
                    log.warning("group commit of %d writes failed; writing each alone",
                                len(group), exc_info=True)
                for req in group:
                    try:
                        self._write([req])
                    except Exception as e:  # noqa: BLE001  (the task decides: retry or fail)
                        req.future.set_exception(e)

    def _write(self, group: list[_Req]) -> None:
        by_kind: dict[str, list[_Req]] = {}
        for req in group:
            by_kind.setdefault(req.kind, []).append(req)
        results: list[tuple[_Req, object]] = []
        with self.write_lock or nullcontext(), self.sessions.begin() as s:
            for kind, reqs in by_kind.items():
                results += zip(reqs, self._bulk[kind](s, [r.arg for r in reqs]), strict=True)
        for req, value in results:  # only now: the transaction is committed
            req.future.set_result(value)
