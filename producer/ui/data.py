"""What the results page reads: jobs with the parts of their predictions a person
looks at (labels, transcript), and input blobs with their media type. Owner-scoped
like the API (``owner=None`` only for admin keys); blocking, so the routes call
these in the thread pool."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import UTC, datetime

import soundfile as sf
from PIL import Image, UnidentifiedImageError

from core import store
from core.jobs import ACTIVE
from core.store import Job, corrections

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
    owner: str | None = None  # the key id that made it (only it may correct the label)
    correction: dict | None = None  # Correction.as_dict(): the right label, who, when

    @property
    def correctable(self) -> bool:
        """A finished classify job: its right label may be marked (by its owner)."""
        return self.task == "classify" and self.status == "succeeded"

    @property
    def label_choices(self) -> list[str]:
        """The labels the job asked about, then any the prediction names besides."""
        asked = [str(lb) for lb in self.params.get("labels") or []]
        return asked + [lb for lb, _ in self.labels if lb not in asked]

    @property
    def corrected_at(self) -> str | None:
        at = (self.correction or {}).get("corrected_at")
        return at[:19].replace("T", " ") if at else None

    @property
    def pending(self) -> bool:
        return self.status in ACTIVE

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
                worker=job.worker, attempts=job.attempts or 0, created_exact=job.created_at,
                owner=job.owner)
    if pred is not None:
        labels, transcript, dim = pred
        v.labels = [(str(lb), float(sc)) for lb, sc in (labels or [])]
        v.transcript, v.dim = transcript, dim
    return v


def list_views(sessions, *, owner: str | None, modality: str | None, status: str | None,
               task: str | None, before: tuple[datetime, str] | None,
               limit: int) -> list[JobView]:
    """Newest first, keyset-paginated: ``store.list_jobs``."""
    with sessions() as sess:
        jobs = store.list_jobs(session=sess, owner=owner, modality=modality, status=status,
                               task=task, before=before, limit=limit)
        preds = store.prediction_summaries(session=sess, job_ids=[j.id for j in jobs])
        return _with_corrections(sess, [_view(j, preds.get(j.id)) for j in jobs])


def views_by_id(sessions, ids: list[str], *, owner: str | None) -> dict[str, JobView]:
    """The jobs among ``ids`` this owner may see (others are simply absent)."""
    if not ids:
        return {}
    with sessions() as sess:
        jobs = store.jobs_by_id(session=sess, job_ids=ids, owner=owner)
        preds = store.prediction_summaries(session=sess, job_ids=[j.id for j in jobs])
        views = _with_corrections(sess, [_view(j, preds.get(j.id)) for j in jobs])
        return {v.id: v for v in views}


def _with_corrections(sess, views: list[JobView]) -> list[JobView]:
    found = corrections.corrections_by_job(
        session=sess, job_ids=[v.id for v in views if v.task == "classify"])
    for v in views:
        if v.id in found:
            v.correction = found[v.id].as_dict()
    return views


def job_view(sessions, job_id: str, *, owner: str | None) -> JobView | None:
    return views_by_id(sessions, [job_id], owner=owner).get(job_id)


def webhooks(sessions, job_id: str) -> list[dict]:
    """The job's webhook deliveries and their attempts (the caller checked the owner)."""
    with sessions() as sess:
        return store.job_webhooks(session=sess, job_id=job_id)


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
    return store.encode_cursor(view.created_exact, view.id)


def parse_cursor(cursor: str) -> tuple[datetime, str]:
    """-> (created_at, id); ValueError for anything this page did not issue."""
    return store.decode_cursor(cursor)
