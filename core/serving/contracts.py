"""What crosses the serving runtime's boundaries, typed.

A job's data passes from the task (workers/tasks.py) to the host, from the host to
a model backend (in this process, or over a pipe to the model process), through
the dynamic batcher, and back to the group-commit writer and the store. These are
the shapes it has on the way. The result, ``JobResult``, lives in core/jobs.py
beside the job vocabulary, since the store writes it too.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from core.config import CPU_BATCH_TOKENS, Settings
from core.errors import InvalidInput
from core.jobs import JobResult

if TYPE_CHECKING:
    import torch

__all__ = ["AdapterRef", "BatcherConfig", "Cancelled", "DeadlineExceeded", "Failure",
           "JobRequest", "JobResult", "ModelBackend"]


@dataclass(frozen=True)
class BatcherConfig:
    """How the dynamic batcher groups jobs into forwards (core/serving/batcher.py); the
    host hands it to its model backend."""

    max_batch_tokens: int = CPU_BATCH_TOKENS  # real tokens per forward (patches count)
    max_batch_size: int = 128  # items per forward
    # How long the first item of a batch may wait for company while the model idles:
    # the latency a lone job pays so that jobs arriving together share a forward.
    max_wait_ms: float = 5.0
    # Audio: encoder positions + expected decode steps (core/model/speech.py).
    max_batch_frames: int = 25_600
    # Forwards run at once, each by its own batcher thread on its share of torch's
    # intra-op threads (Settings.model_streams); the batcher keeps at most one per thread.
    streams: int = 1

    @classmethod
    def for_device(cls, device: torch.device, settings: Settings,
                   modality: str = "text") -> BatcherConfig:
        """``modality``: the worker's (a worker serves one), which sets the streams."""
        tokens, size, wait_ms = settings.batching(device.type)
        return cls(max_batch_tokens=tokens, max_batch_size=size, max_wait_ms=wait_ms,
                   max_batch_frames=settings.audio_budget(device.type),
                   streams=settings.streams(device.type, modality))

    def budget(self, modality: str) -> int:
        return self.max_batch_frames if modality == "audio" else self.max_batch_tokens


@dataclass(frozen=True)
class AdapterRef:
    """A model version as a worker runs it: the host reads it from the model_versions
    row; the model process loads (and caches) the file after checking its sha256."""

    name: str
    modality: str
    path: str  # absolute: MMQ_ADAPTERS_DIR / the row's adapter_file
    sha256: str

    @property
    def exact(self) -> str:
        """What predictions record: the name and the weights it ran with."""
        return f"{self.name}@{self.sha256[:12]}"


@dataclass(frozen=True)
class JobRequest:
    """One job for the model: the host builds it from the started job row."""

    job_id: str  # carried to the batcher: a cancelled job is dropped from its queue by id
    # The fencing token of the start that runs it (store.start_jobs' ``attempts``): with
    # the job id, it names this run of the job across the pipe and back.
    attempt: int
    modality: str
    payload: object  # text (str) or the image/audio bytes
    labels: list[str] | None  # classify: the label set; embed: None
    top_k: int
    deadline: float | None  # time.monotonic() seconds (one clock for every process)
    adapter: AdapterRef | None = None  # None: the pretrained tower (version "base")


class DeadlineExceeded(Exception):
    """The job's deadline passed while it waited for a batch."""


class Cancelled(Exception):
    """The job was cancelled while it waited for a batch: it was dropped unrun."""


@dataclass(frozen=True)
class Failure:
    """An error on its way across a process boundary, keeping what the receiver needs
    to raise the same thing: its class, and for bad input its kind and item index."""

    kind: str  # "invalid", "deadline", "cancelled" or "error"
    message: str
    input_kind: str = InvalidInput.INVALID  # InvalidInput.kind: 422, 413 or 415
    index: int | None = None

    @classmethod
    def of(cls, e: BaseException) -> Failure:
        if isinstance(e, InvalidInput):
            return cls("invalid", e.reason, e.kind, e.index)
        if isinstance(e, DeadlineExceeded):
            return cls("deadline", str(e))
        if isinstance(e, Cancelled):
            return cls("cancelled", str(e))
        return cls("error", f"{type(e).__name__}: {e}")

    def exception(self) -> Exception:
        if self.kind == "invalid":
            return InvalidInput(self.message, index=self.index, kind=self.input_kind)
        if self.kind == "deadline":
            return DeadlineExceeded(self.message)
        if self.kind == "cancelled":
            return Cancelled(self.message)
        return RuntimeError(self.message)


class ModelBackend(Protocol):
    """The model and its batcher as the host sees them: in the worker process
    (``InProcessModel``) or in a child process (``ModelProcess``)."""

    version: str
    device: str
    cfg: BatcherConfig

    def wait_ready(self) -> None:
        """Return once the model is loaded (a child process loads while the worker
        migrates the store); raise if it could not load."""

    def submit(self, request: JobRequest) -> Future:
        """-> a future of a ``JobResult``; ``InvalidInput`` or ``DeadlineExceeded``
        (or another error) as its exception."""

    def submit_many(self, requests: list[JobRequest]) -> list[Future]:
        """``submit`` for several requests at once -> a future per request, in order."""

    def cancel(self, job_ids: list[str]) -> None:
        """Drop these jobs from batches that have not started (their futures raise
        ``Cancelled``); a job already in a running forward finishes, and the store's
        fence drops its outcome."""

    def close(self) -> None: ...
