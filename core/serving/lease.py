"""A worker's lease: renewed in the store every ``lease_renew_s``; a worker whose lease
is older than ``lease_s`` is taken for dead and its running jobs are recovered by the
sweep (core/broker/sweep.py).

Two cases need care. After a database outage every lease is stale at once, and a
sweep run before the live workers have renewed would take all their running jobs
for orphans: so this worker sweeps only once its own lease has been renewed for a
whole ``lease_s`` in a row. And a job whose outcome could not be recorded (the
database and the broker both down) is handed back: on the next renewal it goes
back to ``queued`` under no worker, for the sweep to find.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import AbstractContextManager
from typing import Protocol

from sqlalchemy.orm import Session

from core import store
from core.config import Settings
from core.errors import brief_error, brief_traceback

log = logging.getLogger("mmq.worker")


class LeaseHost(Protocol):
    """What the keeper uses of a ``ModelHost``."""

    settings: Settings

    def tx(self) -> AbstractContextManager[Session]: ...

    def check_cancelled(self) -> list[str]: ...


class LeaseKeeper:
    def __init__(self, host: LeaseHost, worker: str, modality: str):
        self.host, self.worker, self.modality = host, worker, modality
        self.healthy_since: float | None = None  # monotonic; None while renewals fail
        self.renewed_at: float | None = None  # monotonic: start of the last good renewal
        self._abandoned: set[str] = set()
        self._lock = threading.Lock()

    def abandon(self, job_id: str) -> None:
        """This worker gives up a running job whose outcome it could not record."""
        with self._lock:
            self._abandoned.add(job_id)

    def may_sweep(self) -> bool:
        """Renewing without a break for one lease: every live worker has renewed since
        the store came back, so a stale lease now means a dead worker. A renewal that
        hangs (a link cut rather than refused) is a break too: then nothing has been
        renewed for a lease."""
        since, last, now = self.healthy_since, self.renewed_at, time.monotonic()
        lease_s = self.host.settings.lease_s
        return (since is not None and last is not None
                and now - since >= lease_s and now - last < lease_s)

    def renew(self) -> None:
        """Renew the lease, hand back abandoned jobs, and drop the jobs in flight here
        that their owners cancelled (``ModelHost.check_cancelled``)."""
        with self._lock:
            abandoned, self._abandoned = self._abandoned, set()
        try:
            with self.host.tx() as s:
                store.renew_lease(session=s, worker=self.worker, modality=self.modality)
                if abandoned:
                    store.release_jobs(session=s, job_ids=sorted(abandoned), worker=self.worker)
        except Exception:
            with self._lock:
                self._abandoned |= abandoned
            raise
        if abandoned:
            log.warning("handed back %d job(s) whose outcome could not be recorded",
                        len(abandoned))
        if cancelled := self.host.check_cancelled():
            log.info("%d job(s) in flight here were cancelled; dropped from their batches "
                     "where not yet running", len(cancelled))

    def tick(self) -> None:
        """One renewal, and the bookkeeping ``may_sweep`` reads."""
        start = time.monotonic()
        try:
            self.renew()
        except Exception as e:  # noqa: BLE001  (the store is down: keep trying)
            if self.healthy_since is not None or not hasattr(self, "_warned"):
                # One line: SQLAlchemy's message carries the statement and parameters;
                # nor does the traceback at debug level (brief_traceback).
                log.warning("could not renew the worker lease (%s); retrying", brief_error(e))
                log.debug("the renewal's error:\n%s", brief_traceback(e))
                self._warned = True
            self.healthy_since = None
            return
        end = time.monotonic()
        # Since the last good renewal began, a lease may have passed with no renewal
        # (this one hung): the run of renewals starts again now.
        if (self.healthy_since is None or self.renewed_at is None
                or end - self.renewed_at >= self.host.settings.lease_s):
            self.healthy_since = end
        self.renewed_at = start

    def run(self, stop: threading.Event) -> None:
        """Beside Celery, not in a task thread, so that a saturated worker still renews."""
        while not stop.is_set():
            self.tick()
            stop.wait(self.host.settings.lease_renew_s)
        try:
            with self.host.tx() as s:
                store.drop_lease(session=s, worker=self.worker)
        except Exception:  # noqa: BLE001  (it will expire by itself)
            log.info("could not drop the worker lease; it expires in %g s",
                     self.host.settings.lease_s)
