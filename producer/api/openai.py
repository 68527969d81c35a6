"""The OpenAI-compatible routes: ``POST /v1/embeddings`` and ``POST /v1/audio/transcriptions``,
so code written for OpenAI's client (or TEI, infinity, vLLM, the Whisper servers) works
against mmq with only ``base_url`` and ``api_key`` changed. ``GET /v1/models`` answers the
client's ``models.list()`` too (producer/api/versions.py).

Each request is a producer like any other: its items become ordinary jobs through the
shared submit path (producer/web/submit.py: the same validation, queue limit and owner),
so they are stored, shown on /ui, found by search and owned by the key. The request then
waits for them, at most ``MMQ_MAX_WAIT_S`` (the long-poll's bound), polling the store from
the event loop as ``/v1/jobs/{id}/wait`` does. Errors here are OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with the statuses of the rest of the
API (401, 413, 415, 422, 429 and 503 with Retry-After; 400 for what OpenAI's API has and
mmq does not); every other route keeps mmq's own error shape.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import store
from core.config import Settings
from core.errors import InvalidInput, brief_error, brief_traceback
from core.inputs import AudioConfig, read_audio
from core.jobs import TERMINAL, JobStatus
from producer.api.transcripts import FORMATS, render_transcript
from producer.sdk import Client
from producer.web.auth import Caller, CallerDep
from producer.web.errors import ERROR_CODES, RETRY_AFTER_S, ApiError
from producer.web.form import read_body
from producer.web.submit import submit

log = logging.getLogger("mmq.api")

# Model names that mean "what this modality serves by default" (the promoted version,
# else the pretrained tower): "default" anywhere, and OpenAI's speech model name, so
# Whisper clients that send model="whisper-1" work unchanged.
DEFAULT_MODELS = {"default", "whisper-1"}
ENGLISH = {"en", "english"}

# OpenAI's error types, by status (its clients branch on the status; people read these).
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
               404: "invalid_request_error", 409: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error", 504: "timeout"}


# -- errors in OpenAI's shape ------------------------------------------------------------------

def openai_error(status: int, message: str, *, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None
                 ) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"),
                      "param": param, "code": code or ERROR_CODES.get(status, "error")}}
    return JSONResponse(body, status_code=status, headers=headers)


class ParamError(ApiError):
    """An ``ApiError`` that names the request field at fault (OpenAI's ``param``)."""

    def __init__(self, status: int, code: str, message: str, param: str | None, **kw):
        super().__init__(status, code, message, **kw)
        self.param = param


def _from_api_error(e: ApiError) -> JSONResponse:
    code = "invalid_api_key" if e.status == 401 else e.code
    return openai_error(e.status, e.message, code=code, param=getattr(e, "param", None),
                        headers=e.headers)


class OpenAIRoute(APIRoute):
    """A route whose every refusal, wherever raised (the key check, body validation,
    the submit service, the store), answers in OpenAI's error shape."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as e:
                return _from_api_error(e)
            except RequestValidationError as e:
                err = (e.errors() or [{"loc": (), "msg": "invalid request"}])[0]
                loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
                return openai_error(422, f"{'.'.join(loc)}: {err.get('msg', '')}",
                                    param=loc[0] if loc else None)
            except StarletteHTTPException as e:
                return openai_error(e.status_code, str(e.detail),
                                    headers=getattr(e, "headers", None))
            except SQLAlchemyError as e:  # DBAPIError, and StatementError besides
                if store.unreachable(e):
                    return openai_error(503, "the results store (database) is unreachable;"
                                        " retry later", code="unavailable",
                                        headers={"Retry-After": str(RETRY_AFTER_S)})
                # Not log.exception: SQLAlchemy's message carries the statement and
                # its parameters (the request's inputs).
                log.error("database error: %s\n%s", brief_error(e), brief_traceback(e))
                return openai_error(500, f"internal error: {type(e).__name__}")
            except Exception as e:  # noqa: BLE001  (logged; the client gets the shape)
                # Briefly, as above: its chain may hold a database error's statement.
                log.error("unhandled error: %s\n%s", brief_error(e), brief_traceback(e))
                return openai_error(500, f"internal error: {type(e).__name__}")

        return route


router = APIRouter(route_class=OpenAIRoute, tags=["openai"])


# -- waiting for the jobs ---------------------------------------------------------------------

async def _wait_done(request: Request, ids: list[str], caller: Caller) -> dict[str, dict]:
    """Wait (at most MMQ_MAX_WAIT_S) until every job is terminal; -> each job as a dict
    with its prediction. Sleeps on the loop, reads in the thread pool (one query a turn).
    A job still unfinished is a 504 that names it (the job goes on; its result can be
    read later), failed or cancelled ones an error that says why."""
    client: Client = request.app.state.client
    s: Settings = request.app.state.settings
    end = time.monotonic() + s.max_wait_s
    poll, pending = 0.02, list(ids)
    while pending:
        statuses = await run_in_threadpool(_statuses, client, pending, caller.scope)
        pending = [j for j in pending if statuses.get(j) not in TERMINAL]
        if not pending or time.monotonic() + poll > end:
            break
        await asyncio.sleep(poll)
        poll = min(poll * 1.5, 0.25)
    if pending:
        raise ParamError(504, "timeout", f"{len(pending)} of {len(ids)} job(s) not done "
                         f"within {s.max_wait_s:g} s (MMQ_MAX_WAIT_S); they go on: read "
                         f"them at /v1/jobs/{pending[0]}", None,
                         headers={"x-should-retry": "false"})  # a retry would queue again
    jobs = await run_in_threadpool(_read_jobs, client, ids, caller.scope)
    for j in ids:
        job = jobs[j]
        if job["status"] != JobStatus.SUCCEEDED.value:
            status = 503 if job["status"] == JobStatus.CANCELLED.value else 500
            raise ParamError(status, f"job_{job['status']}", f"job {j} "
                             f"{job['status']}: {job['error']}", None,
                             headers={"x-should-retry": "false"})
    return jobs


def _statuses(client: Client, ids: list[str], owner: str | None) -> dict[str, str]:
    with client.sessions() as sess:
        return store.job_statuses(session=sess, job_ids=ids, owner=owner)


def _read_jobs(client: Client, ids: list[str], owner: str | None) -> dict[str, dict]:
    with client.sessions() as sess:
        jobs = {j.id: j.as_dict() for j in store.jobs_by_id(session=sess, job_ids=ids,
                                                               owner=owner)}
        preds = store.predictions_by_id(session=sess, job_ids=ids)
        for j, job in jobs.items():
            p = preds.get(j)
            job["prediction"] = None if p is None else {**p.as_dict(False),
                                                        "vector": p.vector()}
    return jobs


def _model_version(model: str | None, param: str = "model") -> str | None:
    """The request's ``model`` as a job's ``model_version``: None for the default (what
    the modality serves when a worker starts the job), else the name itself ("base",
    or a version from GET /v1/models; the submit path checks it exists and fits)."""
    if model is None or not model.strip() or model.strip().lower() in DEFAULT_MODELS:
        return None
    return model.strip()


def _submit(request: Request, items: list[dict], caller: Caller) -> list[str]:
    key = request.headers.get("idempotency-key")
    if key is not None and len(key) > 200:
        raise ParamError(422, "invalid_input", "Idempotency-Key: at most 200 characters",
                         None)
    try:
        ids, _ = submit(request, items, caller, key)
    except ApiError as e:
        # The SDK names the model_version when a version is unknown or of another modality.
        if "model_version" in e.message or "model version" in e.message:
            raise ParamError(e.status, e.code, e.message, "model") from None
        raise
    return ids


# -- POST /v1/embeddings ----------------------------------------------------------------------

class EmbeddingsIn(BaseModel):
    """OpenAI's request. ``input``: a string, or a list of strings and media items
    ``{"image": "data:image/png;base64,..."}`` / ``{"audio": "data:audio/wav;base64,..."}``
    (``data:`` URLs only: the server never fetches a URL)."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str | dict | int | list[int]]
    model: str | None = Field(None, description="'default', 'base', or a model version "
                              "(GET /v1/models)")
    encoding_format: Literal["float", "base64"] = "float"
    # Strict: an integer, not "384" or 384.0 (OpenAI's type; lax mode took them).
    dimensions: int | None = Field(None, strict=True,
                                   description="if given, the model's own (384)")
    user: str | None = None  # accepted and ignored, as an end-user tag


def _embedding_items(body: EmbeddingsIn, settings: Settings) -> list[dict]:
    raw = [body.input] if isinstance(body.input, str) else body.input
    if not raw:
        raise ParamError(422, "invalid_input", "input: an empty list", "input")
    if len(raw) > settings.max_batch_items:
        raise ParamError(413, "payload_too_large", f"{len(raw)} inputs in one request, over "
                         f"the limit of {settings.max_batch_items}", "input")
    version = _model_version(body.model)
    items = []
    for i, x in enumerate(raw):
        item = {"task": "embed", "model_version": version}
        if isinstance(x, str):
            item.update(modality="text", input=x)
        elif isinstance(x, dict):
            item.update(_media_item(i, x))
        else:  # token ids: mmq tokenizes itself
            raise ParamError(400, "unsupported", f"input[{i}]: token arrays are not "
                             "supported; send the text", "input")
        items.append(item)
    return items


def _media_item(i: int, x: dict) -> dict:
    kinds = [k for k in ("text", "image", "audio") if k in x]
    if len(kinds) != 1 or len(x) != 1 or not isinstance(x[kinds[0]], str):
        raise ParamError(422, "invalid_input", f"input[{i}]: an item is a string, or one "
                         'of {"text": ...}, {"image": "data:..."}, {"audio": "data:..."}',
                         "input")
    kind, value = kinds[0], x[kinds[0]]
    if kind == "text":
        return {"modality": "text", "input": value}
    if not value.startswith("data:"):
        raise ParamError(400, "unsupported", f"input[{i}].{kind}: only data: URLs "
                         "(data:<type>;base64,<bytes>); the server never fetches a URL",
                         "input")
    head, sep, data = value.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ParamError(422, "invalid_input", f"input[{i}].{kind}: a data URL must be "
                         "data:<type>;base64,<bytes>", "input")
    try:
        payload = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ParamError(422, "invalid_input", f"input[{i}].{kind}: not valid base64",
                         "input") from None
    return {"modality": kind, "input": payload}


@router.post("/v1/embeddings", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingsIn"}}}}})
async def create_embeddings(request: Request, caller: CallerDep) -> Response:
    """OpenAI's embeddings: one ``embed`` job per input, waited for; the vectors are
    unit length (384 floats), as little-endian float32 when ``encoding_format`` is base64."""
    s: Settings = request.app.state.settings
    raw = await read_body(request, s.max_request_bytes)
    try:
        body = EmbeddingsIn.model_validate(json.loads(raw))
    except (ValueError, RecursionError) as e:
        raise _invalid_body(e) from None
    items = _embedding_items(body, s)
    ids = await run_in_threadpool(_submit, request, items, caller)
    jobs = await _wait_done(request, ids, caller)
    data, tokens = [], 0
    for i, j in enumerate(ids):
        pred = jobs[j]["prediction"]
        vec = np.asarray(pred["vector"], "<f4")  # (384,) unit length
        if body.dimensions is not None and body.dimensions != vec.shape[0]:
            raise ParamError(400, "unsupported", f"dimensions: this model's embeddings have "
                             f"{vec.shape[0]}; it cannot shorten them", "dimensions")
        emb = (base64.b64encode(vec.tobytes()).decode() if body.encoding_format == "base64"
               else vec.tolist())
        data.append({"object": "embedding", "index": i, "embedding": emb, "job_id": j})
        tokens += pred["tokens"] or 0
    return JSONResponse({"object": "list", "data": data,
                         # The name asked for (each job records the exact version)
                         "model": body.model or "default",
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _invalid_body(e: ValueError | RecursionError) -> ApiError:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"]]
        return ParamError(422, "invalid_input", f"{'.'.join(loc)}: {err['msg']}",
                          loc[0] if loc else None)
    if isinstance(e, RecursionError):
        return ParamError(422, "invalid_input", "body is not valid JSON: nested too deeply",
                          None)
    return ParamError(422, "invalid_input", f"body is not valid JSON: {e}", None)


# -- POST /v1/audio/transcriptions ------------------------------------------------------------

TRANSCRIBE_FIELDS = {"file", "model", "response_format", "language", "prompt", "temperature",
                     "timestamp_granularities[]", "timestamp_granularities", "stream"}


@router.post("/v1/audio/transcriptions", openapi_extra={"requestBody": {
    "required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary"},
            "model": {"type": "string", "description": "'whisper-1', 'default', 'base', "
                      "or an audio model version"},
            "response_format": {"type": "string", "enum": list(FORMATS)},
            "language": {"type": "string", "description": "en only (Whisper tiny.en)"},
            "temperature": {"type": "number", "description": "accepted; decoding is "
                            "deterministic (beam search)"}}}}}}})
async def create_transcription(request: Request, caller: CallerDep) -> Response:
    """OpenAI's transcriptions: the audio becomes a ``transcribe`` job, waited for; the
    text is the job's transcript, and srt, vtt and verbose_json time its segments with
    Whisper's own timestamp tokens."""
    s: Settings = request.app.state.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise ParamError(415, "unsupported_media_type", "send multipart/form-data with the "
                         "audio in 'file'", None)
    request._body = await read_body(request, s.max_request_bytes)  # the capped body
    try:
        form = await request.form(max_files=1, max_fields=32)
    except (UnicodeDecodeError, ValueError) as e:
        raise ParamError(422, "invalid_input", f"unreadable form: {e}", None) from None
    unknown = sorted(set(form.keys()) - TRANSCRIBE_FIELDS)
    if unknown:
        raise ParamError(422, "invalid_input", f"unknown field {unknown[0]!r}", unknown[0])
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ParamError(422, "invalid_input", "file: the audio file is required", "file")
    fmt = str(form.get("response_format") or "json")
    if fmt not in FORMATS:
        raise ParamError(422, "invalid_input", f"response_format: one of "
                         f"{', '.join(FORMATS)}, not {fmt!r}", "response_format")
    _check_options(form)
    audio = await upload.read()
    item = {"modality": "audio", "task": "transcribe", "input": audio,
            "model_version": _model_version(form.get("model"))}
    ids = await run_in_threadpool(_submit, request, [item], caller)
    job = (await _wait_done(request, ids, caller))[ids[0]]
    pred = job["prediction"]
    body, media = render_transcript(fmt, pred.get("text") or "", pred.get("segments"),
                                    duration=await run_in_threadpool(_duration, audio))
    headers = {"Mmq-Job-Id": ids[0]}  # the job this transcript is (GET /v1/jobs/{id})
    if media == "application/json":
        return JSONResponse(body, headers=headers)
    return PlainTextResponse(body, media_type=media, headers=headers)


def _check_options(form) -> None:
    lang = form.get("language")
    if lang and str(lang).strip().lower() not in ENGLISH:
        raise ParamError(400, "unsupported_language", f"language {str(lang)!r}: this "
                         "server's speech model (Whisper tiny.en) transcribes English only; "
                         "send language=en or leave it out", "language")
    if form.get("prompt"):
        raise ParamError(400, "unsupported", "prompt: not supported by this server",
                         "prompt")
    if str(form.get("stream") or "false").lower() not in ("false", "0"):
        raise ParamError(400, "unsupported", "stream: not supported; the transcript comes "
                         "whole", "stream")
    grains = (form.getlist("timestamp_granularities[]")
              + form.getlist("timestamp_granularities"))
    if any(str(g) != "segment" for g in grains):
        raise ParamError(400, "unsupported", "timestamp_granularities: only 'segment'",
                         "timestamp_granularities")
    temp = form.get("temperature")
    if temp not in (None, ""):
        try:
            float(temp)
        except ValueError:
            raise ParamError(422, "invalid_input", f"temperature: not a number: {temp!r}",
                             "temperature") from None


def _duration(audio: bytes) -> float | None:
    """The clip's seconds (soundfile reads the header and samples; no torch here)."""
    try:
        wave, rate = read_audio(audio, AudioConfig(max_bytes=len(audio) + 1))
    except InvalidInput:  # the job ran, so this is not expected; say nothing then
        return None
    return round(wave.size / rate, 3)
