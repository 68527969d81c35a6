"""Request and response schemas of the HTTP API, and its error body for OpenAPI (the
error itself, ``ApiError``, is in producer/web/errors.py: the page raises it too).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.jobs import JobStatus, Modality, Task
from producer.web.errors import ERROR_CODES


class ErrorDetail(BaseModel):
    status: int
    code: str = Field(examples=["invalid_input"])
    message: str
    details: Any = None


class ErrorOut(BaseModel):
    error: ErrorDetail


def error_responses(*codes: int) -> dict[int | str, dict]:
    return {c: {"model": ErrorOut, "description": ERROR_CODES[c].replace("_", " ")}
            for c in codes}


class JobIn(BaseModel):
    """One job. Text goes in ``text``; image and audio bytes either as a multipart
    file upload or base64 in ``data_base64``."""

    model_config = ConfigDict(extra="forbid")

    modality: Modality = Modality.TEXT
    text: str | None = None
    data_base64: str | None = None
    task: Task = Task.EMBED
    labels: list[str] | None = Field(None, description="required for task=classify")
    # Bounds (MMQ_MAX_TOP_K, MMQ_MAX_TIMEOUT_S, MMQ_MAX_LABELS, MMQ_MAX_LABEL_CHARS) are
    # the SDK's, checked in core/params.py, so JSON, forms and the SDK agree (422).
    # Types too: strict, since pydantic's lax mode turned "2", true and 1.0 into a
    # top_k of 2, 1 and 1 (and "5", true into a timeout_s) that the SDK refuses. An int
    # is still a number of seconds. (A form's fields are strings: upload_items parses them.)
    top_k: int = Field(5, strict=True, description="1..MMQ_MAX_TOP_K (default 1000)")
    # Dropped (status cancelled) if no worker has started it this many seconds after submit.
    timeout_s: float | None = Field(None, strict=True, description="seconds, above 0 and "
                                    "at most MMQ_MAX_TIMEOUT_S (default 7 days)")
    model_version: str | None = Field(None, description="a version of this modality "
                                      "(GET /v1/models) or 'base'; default: the promoted "
                                      "one when a worker starts the job")
    webhook_url: str | None = Field(None, description="POSTed a signed event (Standard "
                                    "Webhooks) when the job ends: http(s), a public host")
    webhook_embedding: bool = Field(False, strict=True,  # not "yes" or 1 (lax mode took them)
                                    description="the webhook's event carries the embedding")


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[JobIn] = Field(min_length=1)
    webhook_url: str | None = Field(None, description="every item's that names none")
    webhook_embedding: bool | None = Field(None, strict=True)


# The multipart form of POST /v1/jobs and /v1/jobs:batch, for OpenAPI (the routes
# parse the form themselves, because one route takes both JSON and multipart).
def multipart_schema(batch: bool) -> dict:
    file_field = ({"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}
                  if batch else {"file": {"type": "string", "format": "binary"}})
    return {
        "type": "object",
        "required": ["files" if batch else "file"],
        "properties": {
            **file_field,
            "modality": {"type": "string", "enum": ["image", "audio"],
                         "description": "default: found by decoding the file"},
            "task": {"type": "string", "enum": [t.value for t in Task]},
            "labels": {"type": "string", "description": "comma-separated, for classify"},
            "top_k": {"type": "integer", "minimum": 1,
                      "description": "at most MMQ_MAX_TOP_K (default 1000)"},
            "timeout_s": {"type": "number", "exclusiveMinimum": 0},
            "model_version": {"type": "string", "description": "GET /v1/models; 'base'"},
            "webhook_url": {"type": "string", "description": "POSTed a signed event when "
                            "the job ends"},
            "webhook_embedding": {"type": "boolean"},
        },
    }


class Accepted(BaseModel):
    """A job as its submit accepted it. An Idempotency-Key replay repeats this answer as
    it was: its ``status`` is the job's then, not now (``GET location``)."""

    id: str
    status: JobStatus = Field(description="queued: the job's status when the submit "
                                          "accepted it (a replay says so again); its "
                                          "status now is at location")
    location: str


class BatchAccepted(BaseModel):
    jobs: list[Accepted]
    replayed: bool = Field(description="true: an earlier call with this Idempotency-Key "
                                       "created these jobs; nothing new was queued")


class PredictionOut(BaseModel):
    labels: list[tuple[str, float]] | None = None  # classify: [label, score], best first
    dim: int | None = None
    embedding: list[float] | None = None
    tokens: int | None = None
    truncated: bool | None = None  # the input was cut at the model's length limit
    model_version: str | None = None
    text: str | None = Field(None, description="audio: the transcript (what was said)")
    segments: list[tuple[float, float, str]] | None = Field(
        None, description="audio: [start s, end s, text] of each spoken segment, timed by "
        "Whisper's timestamp tokens; the texts joined are the transcript")


class Timings(BaseModel):
    queue_s: float | None = Field(None, description="submit to start")
    run_s: float | None = Field(None, description="start to finish")
    total_s: float | None = Field(None, description="submit to result")


class JobOut(BaseModel):
    id: str
    modality: Modality
    task: Task
    params: dict
    status: JobStatus
    attempts: int
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline: datetime | None = None
    worker: str | None = None
    model_version: str | None = None
    payload_sha256: str | None = None
    # The id of the API key that submitted the job (a name or key-<hash>, never the
    # key); null for jobs made by the SDK or CLI.
    owner: str | None = None
    webhook_url: str | None = None  # where its event goes (GET /v1/jobs/{id}/webhooks)
    timings: Timings
    prediction: PredictionOut | None = None


class WebhookAttemptOut(BaseModel):
    number: int
    at: datetime
    status_code: int | None = Field(None, description="null: no answer (see error)")
    error: str | None = None
    duration_ms: float


class WebhookOut(BaseModel):
    id: str = Field(description="the webhook-id header, the same on every retry")
    event: str = Field(examples=["job.succeeded"])
    url: str
    status: str = Field(description="pending | delivered | failed (gave up)")
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None
    last_error: str | None = None
    history: list[WebhookAttemptOut]


class WebhooksOut(BaseModel):
    webhooks: list[WebhookOut]


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")


def _utc(v: str | None) -> datetime | None:
    if not v:
        return None
    d = datetime.fromisoformat(v)
    return d if d.tzinfo else d.replace(tzinfo=UTC)  # SQLite hands back naive UTC


def job_out(job: dict) -> JobOut:
    fields = {k: v for k, v in job.items() if k in JobOut.model_fields}
    for k in ("created_at", "started_at", "finished_at", "deadline"):
        fields[k] = _utc(job.get(k))

    def seconds(a: str, b: str) -> float | None:
        if fields[a] is None or fields[b] is None:
            return None
        return round((fields[b] - fields[a]).total_seconds(), 6)

    timings = Timings(queue_s=seconds("created_at", "started_at"),
                      run_s=seconds("started_at", "finished_at"),
                      total_s=seconds("created_at", "finished_at"))
    return JobOut(**fields, timings=timings)
