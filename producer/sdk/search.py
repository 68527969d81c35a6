"""Search for the SDK (``Client.search``), the CLI and the API: embed the query through
the model, then ask the process's ``SearchEngine`` for the nearest stored jobs.

The query is embedded by a short job on its modality's queue (the API stays
torch-free: ~115 MiB instead of a model per API process). Measured on a running
stack (bench/search_query.py): see the README's search section for the numbers and
why the queued path was kept. The query job is marked ``params.search_query`` and
carries a deadline of ``MMQ_SEARCH_QUERY_TIMEOUT_S``, so a worker that reaches it
late drops it; the vector cache never loads such jobs, so they are never results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from core import store
from core.errors import InvalidInput
from core.inputs import sniff_modality
from core.jobs import MODALITIES, TASKS, JobStatus
from core.params import check_instant, check_top_k
from core.search import SEARCH_QUERY_PARAM, SearchFilters, SearchHit, SearchStats

FILTERS = ("modality", "task", "label", "model_version", "created_since", "created_until")


class SearchUnavailable(RuntimeError):
    """The query could not be embedded in time (no worker for its queue, or a backlog)."""


@dataclass(frozen=True)
class Query:
    """A validated query: what to embed and on which queue."""

    modality: str  # text | image | audio: the queue that embeds it
    data: str | bytes


@dataclass
class SearchResult:
    hits: list[SearchHit]
    stats: SearchStats
    query_modality: str
    query_job: str  # the id of the job that embedded the query
    embed_s: float  # submit to embedding read back
    search_s: float  # the engine's part


def make_query(query: object, modality: str | None = None) -> Query:
    """A str is text; bytes, or a ``pathlib.Path``, are an image or audio file whose
    kind is found from its bytes unless ``modality`` says it."""
    if isinstance(query, str) and modality in (None, "text"):
        return Query("text", query)
    if isinstance(query, Path):
        try:
            query = query.read_bytes()
        except OSError as e:
            raise InvalidInput(f"cannot read {query}: {e.strerror}") from None
    if isinstance(query, bytearray | memoryview):
        query = bytes(query)
    if not isinstance(query, bytes):
        raise InvalidInput(f"a query is text (str) or an image/audio file (bytes or a "
                           f"pathlib.Path), got {type(query).__name__}")
    if not query:
        raise InvalidInput("query file is empty (0 bytes)")
    if modality not in (None, "image", "audio"):
        raise InvalidInput(f"query modality must be image or audio for bytes, got {modality!r}")
    return Query(modality or sniff_modality(query, what="query: "), query)


def make_filters(owner: str | None = None, **given) -> SearchFilters:
    """Filters by the names ``Client.search`` takes, checked (``InvalidInput``)."""
    unknown = sorted(set(given) - set(FILTERS))
    if unknown:
        raise InvalidInput(f"unknown search filter(s): {', '.join(unknown)}; "
                           f"filters are {', '.join(FILTERS)}")
    f = {k: v for k, v in given.items() if v is not None}
    if f.get("modality") not in (None, *MODALITIES):
        raise InvalidInput(f"modality filter must be one of {', '.join(MODALITIES)}, "
                           f"got {f['modality']!r}")
    if f.get("task") not in (None, *TASKS):
        raise InvalidInput(f"task filter must be one of {', '.join(TASKS)}, got {f['task']!r}")
    for name in ("label", "model_version"):
        if name in f and (not isinstance(f[name], str) or not f[name].strip()):
            raise InvalidInput(f"{name} filter must be a non-empty string")
    for name in ("created_since", "created_until"):
        if name in f:
            f[name] = check_instant(f[name], name)
    return SearchFilters(owner=owner, **f)


def run_search(client, query: object, *, k: int = 10, owner: str | None = None,
               query_owner: str | None = None, query_modality: str | None = None,
               **filters) -> SearchResult:
    """Embed the query (a job on its modality's queue), then search. ``owner``: only
    that key id's jobs are results (None: everyone's); ``query_owner``: whom the query
    job belongs to (default ``owner``). ``InvalidInput`` for a bad query or filter,
    ``SearchUnavailable`` if no worker embeds it in time."""
    try:
        k = check_top_k(k, client.settings.search_max_k)
    except InvalidInput as e:  # same rule as top_k, in the words of a search
        raise InvalidInput(e.reason.replace("top_k", "k"), kind=e.kind) from None
    f = make_filters(owner=owner, **filters)
    q = make_query(query, query_modality)
    t0 = time.perf_counter()
    job_id, vec, version = embed_query(client, q, owner=query_owner or owner)
    t1 = time.perf_counter()
    hits, stats = client.search_engine().search(
        vec, f.model_version or version, f, k)
    return SearchResult(hits, stats, q.modality, job_id, t1 - t0, time.perf_counter() - t1)


def embed_query(client, q: Query, *, owner: str | None) -> tuple[str, np.ndarray, str]:
    """Submit the query as an embed job, wait for it -> (job id, vector (D,), version)."""
    s = client.settings
    rows = client.validate([{"modality": q.modality, "input": q.data}])
    with client.sessions() as sess:  # fail now, not after the timeout, with no worker
        alive = store.live_workers(session=sess, lease=timedelta(seconds=s.lease_s),
                                   modality=q.modality)
    if not alive:
        raise SearchUnavailable(f"no {q.modality} worker is running to embed the query")
    timeout = s.search_query_timeout_s
    rows[0]["params"] = {SEARCH_QUERY_PARAM: True}
    # Dropped by the worker if it has not started by then: nobody waits for it any more.
    rows[0]["timeout_s"] = timeout
    job_id = client.submit_valid(rows, owner=owner).ids[0]
    status = _wait(client, job_id, timeout)
    with client.sessions() as sess:
        job = store.get_job(session=sess, job_id=job_id)
        pred = store.get_prediction(session=sess, job_id=job_id)
        if status == JobStatus.FAILED.value:  # the worker found the input bad
            raise InvalidInput(f"the query could not be embedded: {job.error}")
        if status != JobStatus.SUCCEEDED.value or pred is None or pred.embedding is None:
            raise SearchUnavailable(
                f"the query was not embedded within {timeout:g} s (is a {q.modality} "
                f"worker running? status {status})")
        return job_id, pred.vector().copy(), pred.model_version or ""


def _wait(client, job_id: str, timeout: float) -> str:
    """Poll the job's status: quickly at first (a query takes tens of milliseconds),
    then every 50 ms."""
    return store.wait_statuses(client.sessions, [job_id], timeout=timeout, poll=0.005,
                               max_poll=0.05)[job_id]
