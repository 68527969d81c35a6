"""The body of a job's webhook event (Standard Webhooks' shape: ``type``,
``timestamp``, ``data``), ``data`` being the job as ``GET /v1/jobs/{id}`` returns it
(producer/api/schemas.py ``JobOut``; tests/e2e/test_webhooks.py holds the two equal),
without the embedding unless the submit asked for it (``webhook_embedding``).

Built here, in core, because workers deliver too and never import the producer. The
job is terminal when its event is made, so every retry sends the same body.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from core.store import get_job, get_prediction

_TIMES = ("created_at", "started_at", "finished_at", "deadline")
# JobOut's fields, in its order (producer/api/schemas.py); then timings, prediction.
JOB_FIELDS = ("id", "modality", "task", "params", "status", "attempts", "error",
              "created_at", "started_at", "finished_at", "deadline", "worker",
              "model_version", "payload_sha256", "owner", "webhook_url")
PREDICTION_FIELDS = ("labels", "dim", "embedding", "tokens", "truncated", "model_version",
                     "text", "segments")


def _utc(d: datetime | None) -> datetime | None:
    if d is None:
        return None
    return d.astimezone(UTC) if d.tzinfo else d.replace(tzinfo=UTC)  # SQLite: naive UTC


def _iso(d: datetime | None) -> str | None:
    """As pydantic writes a UTC datetime (the API's JSON): ``...Z``."""
    return None if d is None else d.isoformat().replace("+00:00", "Z")


def job_document(session: Session, job_id: str, *, with_embedding: bool) -> dict | None:
    job = get_job(session=session, job_id=job_id)
    if job is None:
        return None
    times = {k: _utc(getattr(job, k)) for k in _TIMES}

    def seconds(a: str, b: str) -> float | None:
        if times[a] is None or times[b] is None:
            return None
        return round((times[b] - times[a]).total_seconds(), 6)

    raw = job.as_dict()
    doc = {k: (_iso(times[k]) if k in times else raw.get(k)) for k in JOB_FIELDS}
    doc["timings"] = {"queue_s": seconds("created_at", "started_at"),
                      "run_s": seconds("started_at", "finished_at"),
                      "total_s": seconds("created_at", "finished_at")}
    pred = get_prediction(session=session, job_id=job_id)
    if pred is None:
        doc["prediction"] = None
    else:
        p = pred.as_dict(with_embedding)
        doc["prediction"] = {k: p.get(k) for k in PREDICTION_FIELDS}
    return doc


def event_body(session: Session, job_id: str, event: str) -> bytes | None:
    """The event's JSON bytes, or None if the job is gone."""
    job = get_job(session=session, job_id=job_id)
    if job is None:
        return None
    doc = job_document(session, job_id, with_embedding=bool(job.webhook_embedding))
    return json.dumps({"type": event, "timestamp": doc["finished_at"] or doc["created_at"],
                       "data": doc}, separators=(",", ":")).encode()
