"""What the results page reads: jobs with the parts of their predictions a person
looks at (labels, transcript), and input blobs with their media type. Owner-scoped
like the API (``owner=None`` only for admin keys); blocking, so the routes call
these in the thread pool."""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

import soundfile as sf
from PIL import Image, UnidentifiedImageError
from sqlalchemy import select

from core import store
from core.store import Job, Prediction

# soundfile's container names -> what an <audio> element is told.
AUDIO_TYPES = {"WAV": "audio/wav", "FLAC": "audio/flac", "OGG": "audio/ogg",
               "MP3": "audio/mpeg", "AIFF": "audio/aiff"}
TEXT_PREVIEW = 280  # characters of a text job shown in the list


@dataclass
class JobView:
    """One job as the page shows it."""

    id: str
    modality: str
    task: str
    status: str
    created_at: str  # "YYYY-MM-DD HH:MM:SS" UTC
    finished_at: str | None
    error: str | None
    text: str | None  # a text job's input (the list shows the first TEXT_PREVIEW chars)
    has_input: bool  # image/audio bytes to show or play
    labels: list[tuple[str, float]] = field(default_factory=list)  # classify, best first
    transcript: str | None = None  # audio: predictions.text
    dim: int | None = None  # embedding size
    model_version: str | None = None
    params: dict = field(default_factory=dict)
    worker: str | None = None
    attempts: int = 0
    score: float | None = None  # search results: similarity to the query
    summary: str | None = None  # search results: the search's own summary
    created_exact: datetime | None = None  # as stored: what a page cursor holds

    @property
    def pending(self) -> bool:
        return self.status in ("queued", "running")

    @property
    def preview(self) -> str | None:
        if self.text is None or len(self.text) <= TEXT_PREVIEW:
            return self.text
        return self.text[:TEXT_PREVIEW] + "…"


def _when(d: datetime | None) -> str | None:
    if d is None:
        return None
    d = d.astimezone(UTC) if d.tzinfo else d  # SQLite gives naive UTC
    return d.strftime("%Y-%m-%d %H:%M:%S")


def _view(job: Job, pred: tuple | None) -> JobView:
    v = JobView(id=job.id, modality=job.modality, task=job.task, status=job.status,
                created_at=_when(job.created_at) or "", finished_at=_when(job.finished_at),
                error=job.error, text=job.text, has_input=job.payload_sha256 is not None,
                model_version=job.model_version, params=dict(job.params or {}),
                worker=job.worker, attempts=job.attempts or 0, created_exact=job.created_at)
    if pred is not None:
        labels, transcript, dim = pred
        v.labels = [(str(lb), float(sc)) for lb, sc in (labels or [])]
        v.transcript, v.dim = transcript, dim
    return v


def _predictions(sess, ids: list[str]) -> dict[str, tuple]:
    """labels, transcript and dim by job id: never the embedding's bytes."""
    if not ids:
        return {}
    q = select(Prediction.job_id, Prediction.labels, Prediction.text, Prediction.dim).where(
        Prediction.job_id.in_(ids))
    return {r[0]: tuple(r[1:]) for r in sess.execute(q)}


def list_views(sessions, *, owner: str | None, modality: str | None, status: str | None,
               task: str | None, before: tuple[datetime, str] | None,
               limit: int) -> list[JobView]:
    """Newest first, keyset-paginated like ``store.list_jobs`` (which has no task filter)."""
    q = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    for col, value in ((Job.owner, owner), (Job.modality, modality), (Job.status, status),
                       (Job.task, task)):
        if value is not None:
            q = q.where(col == value)
    if before:
        at, job_id = before
        q = q.where((Job.created_at < at) | ((Job.created_at == at) & (Job.id < job_id)))
    with sessions() as sess:
        jobs = list(sess.scalars(q))
        preds = _predictions(sess, [j.id for j in jobs])
        return [_view(j, preds.get(j.id)) for j in jobs]


def views_by_id(sessions, ids: list[str], *, owner: str | None) -> dict[str, JobView]:
    """The jobs among ``ids`` this owner may see (others are simply absent)."""
    if not ids:
        return {}
    q = select(Job).where(Job.id.in_(ids))
    if owner is not None:
        q = q.where(Job.owner == owner)
    with sessions() as sess:
        jobs = list(sess.scalars(q))
        preds = _predictions(sess, [j.id for j in jobs])
        return {j.id: _view(j, preds.get(j.id)) for j in jobs}


def job_view(sessions, job_id: str, *, owner: str | None) -> JobView | None:
    return views_by_id(sessions, [job_id], owner=owner).get(job_id)


def job_input(sessions, job_id: str, *, owner: str | None) -> tuple[bytes, str] | None:
    """(bytes, media type) of an image or audio job's input; None when the job is not
    this owner's or has no bytes."""
    with sessions() as sess:
        job = store.get_job(session=sess, job_id=job_id, owner=owner)
        if job is None or job.payload_sha256 is None:
            return None
        data = store.get_blob(session=sess, sha256=job.payload_sha256)
    return data, media_type(data, job.modality)


def media_type(data: bytes, modality: str) -> str:
    """From the bytes (the producer decoded them before it stored them), never from a
    name; anything unrecognised is served as bytes to download, not to render."""
    if modality == "image":
        try:
            fmt = Image.open(io.BytesIO(data)).format
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            fmt = None
        return Image.MIME.get(fmt or "", "application/octet-stream")
    try:
        fmt = sf.info(io.BytesIO(data)).format
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        fmt = None
    return AUDIO_TYPES.get(fmt or "", "application/octet-stream")


def cursor_of(view: JobView) -> str:
    """The next page starts after this job (full precision: many jobs share a second)."""
    at = view.created_exact.isoformat() if view.created_exact else view.created_at
    raw = json.dumps([at, view.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_cursor(cursor: str) -> tuple[datetime, str]:
    """-> (created_at, id); ValueError for anything this page did not issue."""
    try:
        at, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        at = datetime.fromisoformat(str(at))
        return (at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)), str(job_id)
    except (ValueError, TypeError, OverflowError, binascii.Error):
        raise ValueError("not a page cursor this site issued") from None
