"""``python -m workers text|image|audio``: one worker process for one modality.

Spawns the model process (the threads pool has no child processes, so nothing forks
after torch or CUDA are initialised) and migrates the store while it loads, waits for
it before consuming, starts the periodic requeue sweep, then runs Celery's worker on
that modality's queue. This process itself never imports torch.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import socket
import sys
import threading
import uuid
from typing import TYPE_CHECKING

# Only what the model process needs too: it is spawned, and imports this module again
# before it loads the model (SQLAlchemy and Celery are imported in ``main``).
from core.config import get_settings
from core.errors import brief_error, brief_traceback
from core.jobs import QUEUES

if TYPE_CHECKING:
    from core.serving.contracts import BatcherConfig
    from core.serving.lease import LeaseKeeper

log = logging.getLogger("mmq.worker")


def _sweep_forever(modality: str, every: float, lease: LeaseKeeper,
                   stop: threading.Event | None = None) -> None:
    """Re-send this modality's jobs whose message was lost, and put back the
    unacknowledged messages of dead workers (core/broker/sweep.py)."""
    # Dead workers' jobs every turn; stale queued jobs (which means reading every
    # message in the queue) about every 15 s: they are stale only after a minute.
    queued_every = max(1, round(15 / every))
    stop = stop or threading.Event()
    for turn in itertools.count():
        if stop.wait(every):
            return
        if not lease.may_sweep():  # just back from a store outage (core/serving/lease.py)
            continue
        try:
            from core.broker.sweep import sweep

            sweep(get_settings(), modalities=[modality], single_flight=True,
                  queued=turn % queued_every == 0)
        except Exception as e:  # noqa: BLE001  (an outage: the next turn tries again)
            # The driver's message, not SQLAlchemy's (which carries the statement and
            # its parameters); the traceback, cut the same way, at debug level.
            log.warning("sweep failed (%s); will try again", brief_error(e))
            log.debug("the sweep's error:\n%s", brief_traceback(e))


def _first_renewal(lease: LeaseKeeper, every: float) -> None:
    """A worker holds a live lease before it fetches anything: the sweep takes a
    fetched message whose worker (workers/poison.py records it) holds no live lease
    for a dead worker's, and puts it back (core/broker/sweep.py)."""
    while True:
        try:
            lease.renew()
            return
        except Exception as e:  # noqa: BLE001  (the store is down: nothing to do yet)
            log.warning("could not take the worker lease (%s); retrying", brief_error(e))
            log.debug("the lease's error:\n%s", brief_traceback(e))
            threading.Event().wait(every)


def default_concurrency(modality: str, cfg: BatcherConfig) -> int:
    """Task threads, which are also the jobs a worker prefetches: a full batch per
    model stream and one more, so that one gathers while each stream runs one. Image
    and audio batches are held far below ``max_batch_size`` by their token and frame
    budgets (about 40 images, 16 clips on CPU), so their workers keep at most 128: more
    prepared windows in memory, and a larger share of a burst taken from the other
    workers, for no larger batch."""
    n = (cfg.streams + 1) * cfg.max_batch_size
    return n if modality == "text" else min(n, 128)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mmq worker")
    ap.add_argument("modality", choices=QUEUES)
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="task threads (default: twice the batcher's max batch size, "
                    "at most 128 for image and audio)")
    ap.add_argument("--loglevel", default="INFO")
    args = ap.parse_args(argv)
    from core.serving.procs import batch_scheduling, limit_malloc_arenas

    limit_malloc_arenas()
    logging.basicConfig(level=args.loglevel,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()

    from core.serving.runtime import start_runtime

    batch_scheduling()  # before the model process starts: it inherits the policy
    # Unique per start, not just per pid: a restarted container's worker is pid 1 again
    # on the same hostname, and would renew the dead one's lease (its running jobs
    # would then wait out the visibility timeout instead of being recovered).
    name = f"{args.modality}-{os.getpid()}.{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    runtime = start_runtime(settings, args.device, modality=args.modality, worker=name)
    h = runtime.host
    if h.exporter is not None:  # dead letters are counted beside the batching metrics
        from workers import poison

        poison.listeners.append(h.exporter.observe_dead_letter)
    log.info("worker for queue %r: model %s on %s, database %s, broker %s", args.modality,
             h.model.version, h.model.device, settings.db_url.split("@")[-1],
             settings.broker_url.split("@")[-1])
    # Imported here, before any thread starts: importing celery in a second thread while
    # the main one imports it too left the sweep thread with a half-initialised module
    # ("cannot import name 'Celery'") and no sweep for the life of the worker.
    import core.broker.sweep  # noqa: F401

    _first_renewal(runtime.lease, settings.lease_renew_s)
    stop_lease = threading.Event()
    lease = threading.Thread(target=runtime.lease.run, args=(stop_lease,), daemon=True,
                             name="mmq-lease")
    lease.start()
    from core.webhooks.deliver import start_delivery

    # Webhook events of ended jobs: every worker delivers too (core/webhooks/deliver.py).
    deliverer = start_delivery(h.sessions, settings, write_lock=h.write_lock)
    if settings.requeue_every_s > 0:
        threading.Thread(target=_sweep_forever, daemon=True, name="requeue-sweep",
                         args=(args.modality, settings.requeue_every_s, runtime.lease)).start()

    # Celery logs two INFO lines per task; at hundreds of jobs per second that is
    # real CPU taken from the model. Job outcomes are in the store and in Flower.
    for logger in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    import workers.signals  # noqa: F401  (connects the handlers)
    from core.broker.transport import install
    from workers.app import GUARDED_TRANSPORTS, app

    # The guarded transports by URL scheme for the whole process, so that a failover to
    # another Sentinel URL (kombu's Connection.switch) keeps them (core/broker/transport.py).
    install(GUARDED_TRANSPORTS, replace=True)

    app.attach_runtime(runtime)  # what the tasks run on (workers/tasks.py)
    concurrency = args.concurrency or default_concurrency(args.modality, h.model.cfg)
    status = 1
    try:
        app.worker_main([
            "worker", "-Q", args.modality, "--pool", "threads",
            "--concurrency", str(concurrency), "--loglevel", args.loglevel,
            "-n", name, "--without-gossip", "--without-mingle",
        ])
        status = 0
    except SystemExit as e:  # Celery's own exit, with its status
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:  # noqa: BLE001  (logged, then the same exit as any other)
        log.exception("the worker stopped on an error")
    finally:
        # Celery has restored or acknowledged every message by now; dropping the
        # lease lets the sweep take any job left running at once.
        stop_lease.set()
        if deliverer is not None:
            deliverer.stop()
        lease.join(timeout=10)
        runtime.close()
    _leave(status)


def _leave(status: int) -> None:
    """Exit without joining task threads. After a cold shutdown (Ctrl-C twice, SIGQUIT)
    Celery's threads pool leaves its tasks running, each waiting on its jobs' futures,
    which the stopped model process never resolves: the interpreter's exit joined those
    threads for up to their result timeout (90 min), the metrics port still bound. Their
    messages are restored or unacknowledged (redelivered), and the lease is dropped, so
    the sweep hands their jobs on: nothing is lost by not waiting."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
