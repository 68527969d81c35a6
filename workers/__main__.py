"""``python -m workers text|image|audio``: one worker process for one modality.

Loads the model once, before consuming (the threads pool has no child processes,
so nothing forks after torch or CUDA are initialised), migrates the store, starts
the periodic requeue sweep, then runs Celery's worker on that modality's queue.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import socket
import threading

from core.config import QUEUES, get_settings

log = logging.getLogger("mmq.worker")


def _sweep_forever(modality: str, every: float) -> None:
    """Re-send this modality's queued jobs whose message was lost (broker restart)."""
    from producer.requeue import requeue_stale

    while True:
        threading.Event().wait(every)
        try:
            n = requeue_stale(get_settings(), modalities=[modality], single_flight=True)
            if n:
                log.warning("requeued %d %s job(s) whose message was lost", n, modality)
        except Exception:
            log.exception("requeue sweep failed; will try again")


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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mmq worker")
    ap.add_argument("modality", choices=QUEUES)
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="task threads (default: twice the batcher's max batch size)")
    ap.add_argument("--loglevel", default="INFO")
    args = ap.parse_args(argv)
    limit_malloc_arenas()
    logging.basicConfig(level=args.loglevel,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()

    from core.migrations import upgrade
    from workers.host import init_host

    upgrade(settings.db_url)
    batch_scheduling()
    name = f"{args.modality}-{os.getpid()}@{socket.gethostname()}"
    h = init_host(settings, args.device, modality=args.modality, worker=name)
    log.info("worker for queue %r: model %s on %s, database %s, broker %s", args.modality,
             h.model.version, h.model.device, settings.db_url.split("@")[-1],
             settings.broker_url.split("@")[-1])
    if settings.requeue_every_s > 0:
        threading.Thread(target=_sweep_forever, args=(args.modality, settings.requeue_every_s),
                         daemon=True, name="requeue-sweep").start()

    # Celery logs two INFO lines per task; at hundreds of jobs per second that is
    # real CPU taken from the model. Job outcomes are in the store and in Flower.
    for logger in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    import workers.signals  # noqa: F401  (connects the handlers)
    from workers.app import app

    concurrency = args.concurrency or 2 * h.model.cfg.max_batch_size
    try:
        app.worker_main([
            "worker", "-Q", args.modality, "--pool", "threads",
            "--concurrency", str(concurrency), "--loglevel", args.loglevel,
            "-n", name, "--without-gossip", "--without-mingle",
        ])
    finally:
        h.close()


if __name__ == "__main__":
    main()
