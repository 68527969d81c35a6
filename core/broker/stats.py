"""What an mmq worker adds to Celery's ``stats`` broadcast, read by `mmq top`.

Celery's own ``total`` counts task messages per task name, and one ``mmq.run_jobs``
message carries up to ``jobs_per_message`` jobs (core/broker/sender.py): it cannot say
how many jobs a worker ran. The worker answers with its own count under ``STATS_KEY``
in the same reply (a worker bootstep's ``info``, workers/app.py), so no second
broadcast round trip is needed; a worker that does not (an older one) has none.
"""

from __future__ import annotations

from dataclasses import dataclass

STATS_KEY = "mmq"  # Celery's keys are its own words (total, pid, uptime, pool ...)


@dataclass(frozen=True)
class WorkerJobStats:
    # Jobs through the model since the worker process started: the worker's batching
    # metrics (BatchMetrics.jobs, exported as mmq_jobs_total). A job that failed before
    # a forward (an undecodable payload, past its deadline, cancelled) is not counted;
    # a redelivered job that ran again is counted again.
    jobs: int

    def to_stats(self) -> dict:
        return {STATS_KEY: {"jobs": self.jobs}}

    @classmethod
    def from_stats(cls, stats: dict) -> WorkerJobStats | None:
        """The count in one worker's ``stats`` reply, or None if it sent none."""
        own = stats.get(STATS_KEY)
        jobs = own.get("jobs") if isinstance(own, dict) else None
        if not isinstance(jobs, int) or isinstance(jobs, bool):
            return None
        return cls(jobs=jobs)
