"""Process-level tuning shared by a worker process and its model process."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger("mmq.worker")


def limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives each busy thread its own malloc arena; with a hundred task threads
    the arenas fragment and the process grows with every job. Two arenas keep it
    bounded (M_ARENA_MAX); a no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, n)  # -8 = M_ARENA_MAX
    except (OSError, AttributeError):
        pass


# The model process's glibc malloc thresholds (``keep_freed_memory``), in bytes.
MMAP_THRESHOLD = 256 << 20  # blocks at least this big are still mapped and unmapped
TRIM_THRESHOLD = 512 << 20  # free memory kept at the heap's top before it goes back


def keep_freed_memory() -> None:
    """Keep the memory a forward frees for the next one, in the process that runs the
    model. glibc maps blocks over its mmap threshold (32 MB at most, as it adapts) straight
    from the kernel and unmaps them when freed, and gives the heap's free top back past
    its trim threshold: the next forward's activations (a speech encoder call's tensors
    are 9-37 MB) then fault in every page again, zeroed. For 16 speech windows in bf16
    that was 140,000-210,000 page faults per encoder pass, 1.28-1.36 s against 1.14 s
    without them (2 Zen 5 cores, the forward on a thread, with ``limit_malloc_arenas``).
    Raised thresholds (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD) keep up to TRIM_THRESHOLD
    of freed memory in the process: its resident size stays near its peak, which is what
    the next batch needs (a speech model process over 40 batches of 1-32 windows: 1.6-2.1
    GB resident against 1.2-1.5, peak 2.2 against 1.9 GB). A no-op off glibc; a glibc
    that refuses a threshold keeps its own (logged)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (libc.mallopt(-3, MMAP_THRESHOLD),  # -3 = M_MMAP_THRESHOLD (fixed: no adapting)
              libc.mallopt(-1, TRIM_THRESHOLD))  # -1 = M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return
    if not all(ok):
        log.info("glibc kept its own malloc thresholds (mallopt answered %s)", ok)


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


# The model process's GIL switch interval (seconds); CPython's default is 5 ms.
MODEL_SWITCH_INTERVAL_S = 2e-4


def short_gil_turns() -> None:
    """Shorten the GIL's switch interval in the model process. Its batcher thread
    dispatches a forward's ops while holding the GIL most of the time; its main thread
    (unpickling and tokenizing the next jobs) and its sender thread (pickling results)
    each get the GIL only by asking for a switch, and then may keep it up to the
    interval while the forward waits. With 5 ms turns a text worker's forwards ran
    about 1.7x as long per job as the same batches offline. Measured with
    ``bench/queue_profile.py --worker-env`` (3 alternating rounds, 3,000 short texts,
    bf16 on AMX): 5 ms 1010.6, 1 ms 1035.8, 0.2 ms 1064.2 jobs/s (median), the same
    order in every round; 50 ms was slower still."""
    sys.setswitchinterval(MODEL_SWITCH_INTERVAL_S)


def settle_gc() -> None:
    """Put what start-up built (modules, the model, Celery's and SQLAlchemy's objects)
    out of the cyclic garbage collector's reach, once a process is ready to serve.
    CPython's oldest generation is collected once a quarter as many objects again have
    survived into it, and each such collection walks every tracked object: a text
    worker held 160,000-200,000 and its model process 275,000, so serving short texts
    each paused 110-140 ms every second or so, and the worker's py-spy profile put ~20%
    of its CPU on a ``Future()``'s lock where the pauses landed. Frozen objects are
    never walked (nor freed if they become garbage: start-up's objects live as long as
    the process). ``bench/queue_profile.py --baseline-tree`` (3,000 short texts, 4
    alternating rounds, 2 Zen 5 cores): 877 -> 1,022 jobs/s, ahead in 4 of 4; CPU ms
    per job: worker 0.44 -> 0.37, model process 1.57 -> 1.48. A larger first
    generation threshold as well (10,000 or 50,000 allocations, not 700) was slower:
    the model process's CPU per job rose to 1.5."""
    import gc

    gc.collect()
    gc.freeze()
