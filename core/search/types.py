"""What crosses the search boundary: the filters of a query and the hits it returns."""

from __future__ import annotations

import contextlib
import fcntl
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

# The params flag that marks a job made only to embed a search query. Such jobs are
# never search results (the vector cache skips them); list views may hide them too.
SEARCH_QUERY_PARAM = "search_query"


def is_search_query(params: dict | None) -> bool:
    """True for a job that embeds a search query (not a user's job)."""
    return bool((params or {}).get(SEARCH_QUERY_PARAM))


@dataclass(frozen=True)
class SearchFilters:
    """Which stored predictions a query may return. None = no restriction."""

    modality: str | None = None  # "text" | "image" | "audio": return only these jobs
    task: str | None = None  # "embed" | "classify" | "transcribe"
    # The job's top label (its best-scoring one), compared case-insensitively. Not any
    # stored label: a classify job keeps its top_k labels, and "cat" ranked third at
    # 0.01 is not a cat picture.
    label: str | None = None
    # Only predictions of exactly this version (predictions.model_version). Searches
    # stay within one embedding space either way: the query's, or this version's (a
    # base model and the adapters trained on it, which map into its space; different
    # base models' embeddings are not comparable).
    model_version: str | None = None
    created_since: datetime | None = None  # jobs.created_at >= this
    created_until: datetime | None = None  # jobs.created_at < this
    # The API key id whose jobs may be returned (jobs.owner); None = everyone's (admin
    # keys, and the trusted SDK unless told otherwise).
    owner: str | None = None

    def restricts_rows(self) -> bool:
        """Anything besides the model version narrows the rows searched."""
        return any(v is not None for v in (self.modality, self.task, self.label,
                                           self.model_version, self.created_since,
                                           self.created_until, self.owner))


def epoch(d: datetime) -> float:
    """Seconds since the epoch; a naive datetime is UTC (as the store keeps it)."""
    return (d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp()


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(d: datetime) -> int:
    """Epoch microseconds, exactly (a naive datetime is UTC): how the search cache
    keeps the database's finished_at, comparable across restarts and drivers."""
    return ((d if d.tzinfo else d.replace(tzinfo=UTC)) - EPOCH) // timedelta(microseconds=1)


def at_micros(us: int) -> datetime:
    """The instant of epoch microseconds, as an aware UTC datetime (a bind parameter
    both dialects compare correctly with jobs.finished_at)."""
    return EPOCH + timedelta(microseconds=us)


@dataclass
class SearchHit:
    """One result, best first. ``summary`` is one line a person reads."""

    id: str
    modality: str
    task: str
    score: float  # cosine similarity to the query, -1..1 (higher is nearer)
    summary: str
    created_at: str | None  # ISO 8601, UTC
    model_version: str | None  # the version that made this prediction
    label: str | None = None  # the top label of a classify job
    label_score: float | None = None
    text: str | None = None  # the start of a text job's text, or of an audio transcript
    owner: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SearchStats:
    """How one search was answered (logged, and returned by the API for operators)."""

    method: str  # "exact" | "ann" | "ann->exact" (too few candidates passed the filters)
    searched: int  # vectors of the embedding space in the cache
    candidates: int  # rows that passed the filters (exact) or that the index returned
    model_version: str | None  # the space searched: its base model version


def hit_of(r, score: float) -> SearchHit:
    label, label_score = (r.labels[0][0], float(r.labels[0][1])) if r.labels else (None, None)
    text = r.transcript if r.modality == "audio" else r.text
    parts = []
    if label is not None:
        parts.append(f"{label} ({label_score:.2f})")
    if text:
        cut = text[:80].strip()
        parts.append(f"“{cut}{'…' if len(text) > 80 else ''}”")
    summary = " · ".join(parts) or f"{r.modality} {r.task}"
    created = r.created_at
    return SearchHit(id=r.id, modality=r.modality, task=r.task, score=round(score, 6),
                     summary=summary, model_version=r.model_version,
                     created_at=None if created is None else _iso(created),
                     label=label, label_score=label_score, text=text or None, owner=r.owner)


def _iso(d) -> str:
    return (d if d.tzinfo else d.replace(tzinfo=UTC)).isoformat()


# -- files a host's searching processes share (saved.py, cached.py) ---------------------


@contextlib.contextmanager
def flocked(path: Path):
    """An exclusive ``flock`` on ``path`` (made with its folder if missing), blocking:
    one process of the host writes at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def writable_dir(path: Path, what: str) -> bool:
    """The folder can be made and written; else a warning, and each process keeps its
    own copy of ``what``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(path / ".probe", "a"):
            pass
        return True
    except OSError as e:
        logging.getLogger(__name__).warning(
            "search: cannot save the %s in %s (%s); each process keeps its own copy",
            what, path, e)
        return False
