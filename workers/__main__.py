"""``python -m workers text|image|audio``: one worker process for one modality.

Loads the model once, before consuming (the threads pool has no child processes,
so nothing forks after torch or CUDA are initialised), migrates the store, starts
the periodic requeue sweep, then runs Celery's worker on that modality's queue.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import socket
import threading

from core.config import get_settings
from core.jobs import QUEUES
from core.serving.procs import batch_scheduling, limit_malloc_arenas

log = logging.getLogger("mmq.worker")


def _sweep_forever(modality: str, every: float) -> None:
    """Re-send this modality's jobs whose message was lost, and put back the
    unacknowledged messages of dead workers (core/broker/sweep.py)."""
    from core.broker.sweep import sweep

    # Dead workers' jobs every turn; stale queued jobs (which means reading every
    # message in the queue) about every 15 s: they are stale only after a minute.
    queued_every = max(1, round(15 / every))
    for turn in itertools.count():
        threading.Event().wait(every)
        try:
            sweep(get_settings(), modalities=[modality], single_flight=True,
                  queued=turn % queued_every == 0)
        except Exception as e:  # noqa: BLE001  (an outage: the next turn tries again)
            log.warning("sweep failed (%s: %s); will try again", type(e).__name__, e)


def _heartbeat_forever(h, worker: str, modality: str, stop: threading.Event) -> None:
    """Renew this worker's lease; a worker whose lease lapses is taken for dead and
    its running jobs are re-sent. Runs beside Celery, not in a task thread, so a
    saturated worker still renews it."""
    from core import store

    every, failing = h.settings.lease_renew_s, False
    while not stop.is_set():
        try:
            with h.tx() as s:
                store.renew_lease(session=s, worker=worker, modality=modality)
            failing = False
        except Exception as e:  # noqa: BLE001  (the store is down: keep trying)
            if not failing:
                log.warning("could not renew the worker lease (%s); retrying", e)
            failing = True
        stop.wait(every)
    try:
        with h.tx() as s:
            store.drop_lease(session=s, worker=worker)
    except Exception:  # noqa: BLE001  (it will expire by itself)
        log.info("could not drop the worker lease; it expires in %g s", h.settings.lease_s)


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

    from core.serving.host import init_host
    from core.store.migrations import upgrade

    upgrade(settings.db_url)
    batch_scheduling()
    name = f"{args.modality}-{os.getpid()}@{socket.gethostname()}"
    h = init_host(settings, args.device, modality=args.modality, worker=name)
    if h.exporter is not None:  # dead letters are counted beside the batching metrics
        from workers import poison

        poison.listeners.append(h.exporter.observe_dead_letter)
    log.info("worker for queue %r: model %s on %s, database %s, broker %s", args.modality,
             h.model.version, h.model.device, settings.db_url.split("@")[-1],
             settings.broker_url.split("@")[-1])
    stop_lease = threading.Event()
    lease = threading.Thread(target=_heartbeat_forever, daemon=True, name="mmq-lease",
                             args=(h, name, args.modality, stop_lease))
    lease.start()
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
        # Celery has restored or acknowledged every message by now; dropping the
        # lease lets the sweep take any job left running at once.
        stop_lease.set()
        lease.join(timeout=10)
        h.close()


if __name__ == "__main__":
    main()
