"""The job vocabulary shared by the store, the workers, the SDK, the CLI and the API."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np


class JobStatus(str, Enum):
    QUEUED = "queued"
    """Row written, task sent (or about to be re-sent by ``requeue``); not started."""
    RUNNING = "running"
    """A worker has taken it; redelivered to another worker if that one dies."""
    SUCCEEDED = "succeeded"
    """The prediction is stored. Terminal."""
    FAILED = "failed"
    """``error`` says why (bad input, or retries exhausted). Terminal."""
    CANCELLED = "cancelled"
    """Cancelled before a worker ran it, or dropped past its deadline. Terminal."""

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Modality(str, Enum):
    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"


class Task(str, Enum):
    EMBED = "embed"
    CLASSIFY = "classify"
    TRANSCRIBE = "transcribe"
    """Audio only: the text of what was said (``JobResult.text``), and its embedding."""


# The statuses by whether a job can still change: defined here once, used everywhere.
TERMINAL = tuple(s.value for s in JobStatus if s.terminal)
ACTIVE = tuple(s.value for s in JobStatus if not s.terminal)  # queued, running
# The modalities, in order; one Celery queue each, named after it.
MODALITIES = QUEUES = tuple(m.value for m in Modality)
TASKS = tuple(t.value for t in Task)
# The Celery task names; producers send them by name and never import workers. A
# message runs one job (task id = job id) or a list of them (Settings.jobs_per_message).
RUN_JOB_TASK = "mmq.run_job"
RUN_JOBS_TASK = "mmq.run_jobs"
MAX_JOBS_PER_MESSAGE = 256  # the most job ids a run_jobs message may carry


@dataclass
class JobResult:
    """What the model gives for one job, and what the store keeps of it (the
    ``predictions`` row). A new prediction field is added here and in that table."""

    embedding: np.ndarray | None = None  # (D,) float32, L2-normalised
    labels: list[tuple[str, float]] | None = None  # classify: top_k (label, probability)
    tokens: int = 0  # tokens (patches, frames) the item cost in the packed core
    truncated: bool = False  # the input was longer than the tower's limit and was cut
    text: str | None = None  # audio: the transcript (every audio job has one)
    # audio: the transcript's segments, [start s, end s, text] from Whisper's timestamp
    # tokens; their texts joined (and stripped) are ``text``
    segments: list[tuple[float, float, str]] | None = None
