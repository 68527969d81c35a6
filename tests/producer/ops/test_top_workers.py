"""`mmq top`'s worker rows count jobs, not Celery task messages: one run_jobs message
carries up to 64 jobs, so Celery's ``total`` (messages per task name) said "processed 2"
for a worker that had run 128. The job count is the worker's own (its batching
metrics), added to the same ``stats`` broadcast by a worker bootstep; a worker that
does not send it shows "jobs ?", never a message count passed off as jobs."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

from core.config import Settings
from core.jobs import RUN_JOB_TASK, RUN_JOBS_TASK
from producer.ops.top import Frame, _workers, render


class FakeApp:
    """What ``_workers`` asks of a Celery app: ``control.inspect(timeout).stats()``."""

    def __init__(self, stats: dict):
        inspect = SimpleNamespace(stats=lambda: stats)
        self.control = SimpleNamespace(inspect=lambda timeout: inspect)


def test_worker_rows_show_jobs_from_the_worker_and_messages_from_celery():
    stats = {
        # Two run_jobs messages of 64 jobs, and one job alone.
        "text-11@h": {"total": {RUN_JOBS_TASK: 2, RUN_JOB_TASK: 1}, "uptime": 61,
                      "mmq": {"jobs": 129}},
        "image-12@h": {"total": {RUN_JOBS_TASK: 3}, "uptime": 5},  # sends no job count
    }
    workers = _workers(FakeApp(stats), timeout=0.1)
    got = {w.name: (w.modality, w.jobs, w.messages) for w in workers}
    assert got == {"text-11@h": ("text", 129, 3), "image-12@h": ("image", None, 3)}

    frame = Frame(at=datetime(2025, 1, 1, tzinfo=UTC), window_s=2.0, workers=workers)
    text = render(frame, Settings())
    text_row = next(line for line in text.splitlines() if "text-11@h" in line)
    image_row = next(line for line in text.splitlines() if "image-12@h" in line)
    assert "jobs 129" in text_row and "3 messages" in text_row
    assert "jobs ?" in image_row and "3 messages" in image_row
    assert "processed" not in text
