"""Process-level tuning shared by a worker process and its model process."""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("mmq.worker")


def limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives each busy thread its own malloc arena; with a hundred task threads
    the arenas fragment and the process grows with every job. Two arenas keep it
    bounded (M_ARENA_MAX); a no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, n)  # -8 = M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def batch_scheduling() -> None:
    """Put this process (and the threads and model process it starts) under Linux's
    SCHED_BATCH policy: a thread that wakes no longer preempts the one running.
    A worker hands each job between threads and processes several times; under the
    default policy each hand-off on a busy CPU was a preemption, often of a thread
    holding the GIL. Measured with bench/e2e.py's text worker: 2.5 -> 2.0 ms of
    worker CPU per job, context switches per job 14 -> 8.5. Throughput work, not
    latency work: an idle core still runs a woken thread at once."""
    if hasattr(os, "SCHED_BATCH"):
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError as e:  # a sandbox may forbid it; the default policy still works
            log.info("SCHED_BATCH not set: %s", e)
