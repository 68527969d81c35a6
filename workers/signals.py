"""Cross-cutting concerns as Celery signal handlers: timing and failure logging.

Failure persistence is not here: a task that cannot record its outcome must not
acknowledge its message, and only the task itself can refuse (workers/tasks.py).
"""

from __future__ import annotations

import logging
import time

from celery import signals

log = logging.getLogger("mmq.worker")
_started: dict[str, float] = {}


@signals.task_prerun.connect
def _prerun(task_id=None, **_kw) -> None:
    _started[task_id] = time.perf_counter()


@signals.task_postrun.connect
def _postrun(task_id=None, retval=None, state=None, **_kw) -> None:
    t0 = _started.pop(task_id, None)
    if t0 is not None and isinstance(retval, dict):
        log.debug("job %s %s in %.1f ms", retval.get("job"), retval.get("status", state),
                 1e3 * (time.perf_counter() - t0))


@signals.task_failure.connect
def _failure(task_id=None, exception=None, **_kw) -> None:
    # The task has written the failure to the job row before raising (workers/tasks.py):
    # the outcome must be recorded before the message is acknowledged, and a signal
    # handler runs too late to stop the acknowledgement.
    log.warning("task %s failed: %s: %s", task_id, type(exception).__name__, exception)
