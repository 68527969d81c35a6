"""``POST /v1/search``: the stored jobs nearest to a query, across modalities.

The query is text (``{"query": {"text": ...}}``), an image or audio file as base64
(``{"query": {"data_base64": ..., "modality": "image"}}``, the modality optional:
found from the bytes), or a multipart upload (``file``, or ``text``; the filters as
form fields of the same names; ``query_modality`` for the file's kind). It follows
the input rules of a job (422/413/415), and it is embedded by a short job on its
modality's queue (producer/sdk/search.py). A key sees only its own jobs; admin keys
everyone's. Results are within the query's embedding space (its base model and the
adapters trained into it); ``model_version`` narrows them to one version.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Literal

import redis
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from core.config import Settings
from core.errors import InvalidInput
from core.jobs import Modality, Task
from producer.api.schemas import error_responses
from producer.sdk.search import SearchResult, SearchUnavailable, run_search
from producer.web.auth import CallerDep
from producer.web.errors import ERROR_CODES, INPUT_STATUS, RETRY_AFTER_S, ApiError
from producer.web.form import content_kind, read_body

router = APIRouter(tags=["search"])
FILTER_FIELDS = ("modality", "task", "label", "model_version", "created_since",
                 "created_until")
FORM_FIELDS = {"file", "text", "query_modality", "k", *FILTER_FIELDS}


class QueryIn(BaseModel):
    """Text, or an image/audio file as base64 (its modality found from the bytes
    unless given)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    data_base64: str | None = None
    modality: Literal["image", "audio"] | None = None


class FiltersIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modality: Modality | None = Field(None, description="return only jobs of this modality")
    task: Task | None = None
    label: str | None = Field(None, description="the job's top label (case-insensitive)")
    model_version: str | None = Field(None, description="only predictions of this exact "
                                      "version (default: any in the query's space)")
    created_since: datetime | None = None
    created_until: datetime | None = None


class SearchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: QueryIn
    # Strict: an integer, as in the SDK (check_top_k), not "2", 2.0 or true.
    k: int = Field(10, strict=True, description="results, 1..MMQ_SEARCH_MAX_K (default 1000)")
    filters: FiltersIn = FiltersIn()


class HitOut(BaseModel):
    id: str
    modality: Modality
    task: Task
    score: float = Field(description="cosine similarity to the query, -1..1")
    summary: str
    created_at: datetime | None = None
    model_version: str | None = None
    label: str | None = None
    label_score: float | None = None
    text: str | None = Field(None, description="the start of a text job's text or of an "
                                               "audio transcript")
    owner: str | None = None


class QueryOut(BaseModel):
    modality: Modality
    job_id: str = Field(description="the job that embedded the query (params.search_query)")
    model_version: str | None = Field(description="the space searched: its base model")


class SearchOut(BaseModel):
    results: list[HitOut]
    query: QueryOut
    method: str = Field(description="exact, ann, or ann->exact (too few index candidates "
                                    "passed the filters)")
    searched: int = Field(description="stored vectors of the embedding space")
    embed_ms: float
    search_ms: float


def _multipart_schema() -> dict:
    return {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary", "description": "an image or audio "
                 "query"},
        "text": {"type": "string", "description": "a text query (instead of a file)"},
        "query_modality": {"type": "string", "enum": ["image", "audio"]},
        "k": {"type": "integer", "minimum": 1},
        **{f: {"type": "string"} for f in FILTER_FIELDS}}}


@router.post("/v1/search", response_model=SearchOut,
             responses=error_responses(401, 413, 415, 422, 503),
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"$ref": "#/components/schemas/SearchIn"}},
                 "multipart/form-data": {"schema": _multipart_schema()}}}})
async def search(request: Request, caller: CallerDep) -> SearchOut:
    """The k stored jobs nearest to the query, best first, within the caller's jobs
    (an admin key: everyone's) and the query's embedding space."""
    s: Settings = request.app.state.settings
    query, query_modality, k, filters = await _parse(request, s)
    try:
        await run_in_threadpool(request.app.state.redis.ping)
    except redis.RedisError as e:  # the query could be written but never embedded
        raise ApiError(503, "unavailable", f"the queue (Redis) is unreachable: {e}",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    try:
        res: SearchResult = await run_in_threadpool(
            lambda: run_search(request.app.state.client, query, k=k, owner=caller.scope,
                               query_owner=caller.key_id, query_modality=query_modality,
                               **filters))
    except InvalidInput as e:
        status = INPUT_STATUS.get(e.kind, 422)
        raise ApiError(status, ERROR_CODES[status], str(e)) from None
    except SearchUnavailable as e:
        raise ApiError(503, "unavailable", str(e),
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    return SearchOut(results=[HitOut(**h.as_dict()) for h in res.hits],
                     query=QueryOut(modality=res.query_modality, job_id=res.query_job,
                                    model_version=res.stats.model_version),
                     method=res.stats.method, searched=res.stats.searched,
                     embed_ms=round(res.embed_s * 1e3, 3),
                     search_ms=round(res.search_s * 1e3, 3))


async def _parse(request: Request, s: Settings) -> tuple[object, str | None, int, dict]:
    """-> (query: str or bytes, its modality if given, k, filters) from JSON or a form."""
    ctype = content_kind(request, "send application/json or multipart/form-data")
    body = await read_body(request, s.max_request_bytes)
    if ctype == "multipart/form-data":
        return await _parse_form(request, body)
    try:
        doc = SearchIn.model_validate(json.loads(body))
    except ValidationError as e:
        details = [{"loc": ["body", *err["loc"]], "msg": err["msg"]} for err in e.errors()]
        where = ".".join(str(p) for p in details[0]["loc"])
        raise ApiError(422, "invalid_input", f"{where}: {details[0]['msg']}",
                       details=details) from None
    except (ValueError, RecursionError) as e:
        raise ApiError(422, "invalid_input", f"body is not valid JSON: "
                       f"{type(e).__name__}") from None
    q = doc.query
    if (q.text is None) == (q.data_base64 is None):
        raise ApiError(422, "invalid_input", "query: give either 'text' or 'data_base64'")
    if q.text is not None:
        if q.modality is not None:
            raise ApiError(422, "invalid_input", "query: 'modality' goes with data_base64")
        query: object = q.text
    else:
        try:
            query = base64.b64decode(q.data_base64, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "invalid_input", "query.data_base64 is not valid base64") \
                from None
    filters = {k: getattr(v, "value", v) for k, v in doc.filters.model_dump().items()}
    return query, q.modality, doc.k, filters


async def _parse_form(request: Request, body: bytes) -> tuple[object, str | None, int, dict]:
    request._body = body  # Starlette's form parser replays the capped body
    try:
        form = await request.form(max_files=1, max_fields=16)
    except Exception as e:  # noqa: BLE001  (Starlette's own refusals, bad charsets)
        raise ApiError(422, "invalid_input", f"unreadable multipart form: {e}") from None
    unknown = sorted(set(form.keys()) - FORM_FIELDS)
    if unknown:
        raise ApiError(422, "invalid_input", f"unknown form field(s): {', '.join(unknown)}")
    file, text = form.get("file"), form.get("text")
    if (file is None) == (text is None) or isinstance(text, UploadFile) or (
            file is not None and not isinstance(file, UploadFile)):
        raise ApiError(422, "invalid_input", "upload the query in 'file', or give 'text'")
    query = text if file is None else await file.read()
    fields = {k: form.get(k) or None for k in ("query_modality", "k", *FILTER_FIELDS)}
    try:
        filters = FiltersIn.model_validate({k: fields[k] for k in FILTER_FIELDS})
        k = int(fields["k"]) if fields["k"] is not None else 10
    except (ValidationError, ValueError) as e:
        raise ApiError(422, "invalid_input", f"bad form field: {e}") from None
    if fields["query_modality"] not in (None, "image", "audio"):
        raise ApiError(422, "invalid_input", "query_modality must be image or audio")
    return (query, fields["query_modality"], k,
            {k2: getattr(v, "value", v) for k2, v in filters.model_dump().items()})
