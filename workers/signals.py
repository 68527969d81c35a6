"""Cross-cutting concerns as Celery signal handlers: failure logging, and the
garbage collector settled once the worker is ready (core/serving/procs.py).

Failure persistence is not here: a task that cannot record its outcome must not
acknowledge its message, and only the task itself can refuse (workers/tasks.py).

No task_prerun/task_postrun handlers: Celery sends those signals only when a
receiver is connected, and each send costs the tracer a few microseconds per job,
for what was a debug-level timing line (a job's times are in the store).
"""

from __future__ import annotations

import logging

from celery import signals

from core.errors import brief_error
from core.serving.procs import settle_gc

log = logging.getLogger("mmq.worker")


@signals.task_failure.connect
def _failure(task_id=None, exception=None, **_kw) -> None:
    # The task has written the failure to the job row before raising (workers/tasks.py):
    # the outcome must be recorded before the message is acknowledged, and a signal
    # handler runs too late to stop the acknowledgement. brief_error: a database error
    # that failed the task would otherwise log its whole statement and parameters.
    log.warning("task %s failed: %s", task_id, brief_error(exception))


@signals.worker_ready.connect
def _ready(**_kw) -> None:
    # Celery's consumer and the host are built: start-up's objects leave the collector.
    settle_gc()
