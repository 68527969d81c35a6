"""The HTTP API: submit jobs, read them, wait for them, cancel them.

``mmq api`` serves ``create_app()`` with uvicorn. Every ``/v1`` route needs
``Authorization: Bearer <key>`` (keys from ``MMQ_API_KEYS``; see
``producer/api_auth.py``), and a key sees only the jobs it made. The API is a
producer like the SDK: it validates, writes job rows and sends task messages
through ``producer.sdk.Client``, and reads results from SQL. Blocking database
and Redis calls run in the thread pool; only the long-poll sleeps on the loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from collections import Counter
from datetime import UTC, datetime

import redis
from fastapi import FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import store
from core.broker.admission import Admission, release_room, reserve_room
from core.broker.redis_client import redis_for
from core.config import Settings, get_settings
from core.errors import InvalidInput
from core.jobs import MODALITIES, TERMINAL, JobStatus, Modality
from producer.api_auth import Caller, CallerDep, keyring
from producer.api_metrics import metrics_registry, render_metrics
from producer.api_models import (
    ERROR_CODES,
    Accepted,
    ApiError,
    BatchAccepted,
    BatchIn,
    JobIn,
    JobOut,
    JobPage,
    error_responses,
    job_out,
    multipart_schema,
)
from producer.api_search import SearchIn
from producer.api_search import router as search_router
from producer.api_versions import add_model_routes
from producer.form import read_body, upload_items
from producer.sdk import Client, IdempotencyConflict

log = logging.getLogger("mmq.api")

# Seconds a client is told to wait when its modality's queue is over the limit.
RETRY_AFTER_S = 5
INPUT_STATUS = {InvalidInput.INVALID: 422, InvalidInput.TOO_LARGE: 413,
                InvalidInput.UNSUPPORTED: 415}


def _request_body(batch: bool) -> dict:
    model = "BatchIn" if batch else "JobIn"
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}},
        "multipart/form-data": {"schema": multipart_schema(batch)}}}}


def create_app(settings: Settings | None = None, client: Client | None = None) -> FastAPI:
    s = settings or get_settings()
    app = FastAPI(title="mmq", version="1", summary="Asynchronous multimodal inference jobs",
                  description="Submit text, image and audio jobs; read their predictions.")
    app.state.settings = s
    app.state.client = client or Client(settings=s)
    app.state.redis = redis_for(s, socket_timeout=2, socket_connect_timeout=2)
    app.state.registry = metrics_registry(s, app.state.client, app.state.redis)
    app.state.keyring = keyring(s)  # a malformed key entry stops start-up here
    if not app.state.keyring:
        log.warning("no API keys configured (MMQ_API_KEYS): every /v1 request gets 401")
    _install_error_handlers(app)
    _add_job_routes(app)
    _add_service_routes(app)
    add_model_routes(app)
    app.include_router(search_router)  # POST /v1/search (producer/api_search.py)
    _publish_schemas(app, JobIn, BatchIn, SearchIn)
    from producer.ui import mount_ui  # here: producer.ui builds on this module's routes

    mount_ui(app)  # the results page, /ui
    return app


# -- errors ---------------------------------------------------------------------------------

def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, e: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", "")}
                   for err in e.errors()]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return JSONResponse(ApiError(422, "invalid_input", f"{where}: {first['msg']}",
                                     details=details).body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, e: StarletteHTTPException) -> JSONResponse:
        code = ERROR_CODES.get(e.status_code, "error")
        return JSONResponse(ApiError(e.status_code, code, str(e.detail)).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(DBAPIError)
    async def _database(_req: Request, e: DBAPIError) -> JSONResponse:
        # Its own handler, not the catch-all below: Starlette re-raises what reaches
        # that one after answering, and uvicorn then drops the client's keep-alive
        # connection (the next request on it failed with a read error).
        if store.unreachable(e):  # an outage, not a bug: the client should come back
            log.warning("the results store is unreachable: %s", str(e).splitlines()[0])
            return JSONResponse(ApiError(503, "unavailable", "the results store (database) "
                                         "is unreachable; retry later").body(),
                                status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        log.exception("database error")
        return JSONResponse(ApiError(500, "internal", f"internal error: "
                                     f"{type(e).__name__}").body(), status_code=500)

    @app.exception_handler(Exception)
    async def _internal(_req: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(ApiError(500, "internal", f"internal error: "
                                     f"{type(e).__name__}").body(), status_code=500)


def _publish_schemas(app: FastAPI, *models) -> None:
    """Request models that only the hand-written request bodies refer to still need
    to be in components/schemas for /docs and clients generated from it."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for m in models:
            js = m.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(js.pop("$defs", {}))
            comps[m.__name__] = js
        return schema

    app.openapi = openapi


# -- submitting -----------------------------------------------------------------------------

async def parse_items(request: Request, batch: bool) -> list[dict]:
    """The request's jobs as SDK items, from JSON or a multipart upload."""
    s: Settings = request.app.state.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/json", "multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "send application/json (text, or "
                       "base64 data) or multipart/form-data (image and audio files)")
    body = await read_body(request, s.max_request_bytes)
    if ctype == "multipart/form-data":
        items = await upload_items(request, body, batch=batch, settings=s)
    else:
        try:
            doc = json.loads(body)
            jobs = BatchIn.model_validate(doc).items if batch else [JobIn.model_validate(doc)]
        except (ValueError, RecursionError) as e:  # ValidationError is a ValueError too
            raise _invalid_json(e) from None
        items = [_json_item(i, j) for i, j in enumerate(jobs)]
    if len(items) > s.max_batch_items:
        raise ApiError(413, "payload_too_large", f"{len(items)} items in one request, over "
                       f"the limit of {s.max_batch_items}")
    return items


def _invalid_json(e: ValueError | RecursionError) -> ApiError:
    if isinstance(e, RecursionError):  # e.g. 100,000 "[": json's parser recurses per level
        return ApiError(422, "invalid_input", "body is not valid JSON: arrays or objects "
                        "nested too deeply")
    if isinstance(e, ValidationError):
        details = [{"loc": ["body", *err["loc"]], "msg": err["msg"]} for err in e.errors()]
        where = ".".join(str(p) for p in details[0]["loc"])
        return ApiError(422, "invalid_input", f"{where}: {details[0]['msg']}", details=details)
    return ApiError(422, "invalid_input", f"body is not valid JSON: {e}")


def _json_item(index: int, job: JobIn) -> dict:
    item = {"modality": job.modality.value, "task": job.task.value, "top_k": job.top_k,
            "labels": job.labels, "timeout_s": job.timeout_s,
            "model_version": job.model_version}
    if job.modality is Modality.TEXT:
        if job.data_base64 is not None:
            raise ApiError(422, "invalid_input", f"item {index}: text jobs take 'text', "
                           "not 'data_base64'", details=[{"item": index}])
        item["input"] = job.text
        return item
    if job.text is not None or job.data_base64 is None:
        raise ApiError(422, "invalid_input", f"item {index}: {job.modality.value} jobs take "
                       "'data_base64' (or a multipart file upload)", details=[{"item": index}])
    try:
        item["input"] = base64.b64decode(job.data_base64, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_input", f"item {index}: data_base64 is not valid "
                       "base64", details=[{"item": index}]) from None
    return item


def _submit(request: Request, items: list[dict], caller: Caller,
            idempotency_key: str | None) -> tuple[list[str], bool]:
    """Backpressure, then the SDK's validate + write + send. Runs in the thread pool."""
    app = request.app
    client: Client = app.state.client
    key = None
    if idempotency_key:  # scoped per API key: two clients' keys never collide
        key = f"{caller.key_digest}:{idempotency_key}"
    replay = False
    if key:
        with client.sessions() as sess:
            replay = store.get_idempotency(session=sess, key=key) is not None
    try:  # bad input is a 4xx of its own, whether or not the queue has room
        rows = client.validate(items)
    except InvalidInput as e:
        raise ApiError(INPUT_STATUS.get(e.kind, 422), _input_code(e), str(e),
                       details=None if e.index is None else [{"item": e.index}]) from None
    room = None
    if not replay:  # a replay queues nothing, so the queue limit does not apply to it
        room = _check_queue_room(app, Counter(str(i.get("modality")) for i in items))
    try:
        sub = client.submit_valid(rows, idempotency_key=key, owner=caller.key_id)
    except IdempotencyConflict as e:
        raise ApiError(409, "idempotency_conflict", str(e)) from None
    finally:  # the messages are in the queue now (or never will be): they count there
        _release_queue_room(app, room)
    return sub.ids, sub.replayed


def _input_code(e: InvalidInput) -> str:
    return ERROR_CODES[INPUT_STATUS.get(e.kind, 422)]


def _check_queue_room(app: FastAPI, wanted: Counter) -> Admission | None:
    """Reserve room for the jobs in their queues, or 429. One Redis script checks and
    reserves, so concurrent submits cannot all pass the check and overfill a queue."""
    s: Settings = app.state.settings
    if s.max_queue_depth <= 0:
        return None
    mods = {m: n for m, n in wanted.items() if m in MODALITIES}
    try:
        room = reserve_room(app.state.redis, mods, s.max_queue_depth)
    except redis.RedisError as e:
        raise ApiError(503, "unavailable", f"the queue (Redis) is unreachable: {e}",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    if room.admitted:
        return room
    full = {m: n for m, n in room.depths.items() if n + wanted[m] > s.max_queue_depth}
    if full:
        m, n = next(iter(full.items()))
        raise ApiError(429, "queue_full", f"the {m} queue holds {n} jobs (limit "
                       f"{s.max_queue_depth}); retry later",
                       details={"queue_depth": full}, headers={"Retry-After": str(RETRY_AFTER_S)})


def _release_queue_room(app: FastAPI, room: Admission | None) -> None:
    if room is None:
        return
    try:
        release_room(app.state.redis, room)
    except redis.RedisError as e:  # the reservation's expiry frees it later
        log.warning("could not release queue room %s: %s", room.token, e)


def _add_job_routes(app: FastAPI) -> None:
    submit_errors = error_responses(401, 409, 413, 415, 422, 429, 503)

    @app.post("/v1/jobs", status_code=202, response_model=Accepted, tags=["jobs"],
              responses=submit_errors, openapi_extra=_request_body(batch=False))
    async def submit_job(request: Request, response: Response,
                         caller: CallerDep,
                         idempotency_key: str | None = Header(None, max_length=200)) -> Accepted:
        """Submit one job: JSON (text, or base64 data) or a multipart file upload."""
        items = await parse_items(request, batch=False)
        ids, replayed = await run_in_threadpool(_submit, request, items, caller,
                                                idempotency_key)
        response.headers["Location"] = f"/v1/jobs/{ids[0]}"
        response.headers["Idempotent-Replayed"] = str(replayed).lower()
        return Accepted(id=ids[0], status=JobStatus.QUEUED, location=f"/v1/jobs/{ids[0]}")

    @app.post("/v1/jobs:batch", status_code=202, response_model=BatchAccepted, tags=["jobs"],
              responses=submit_errors, openapi_extra=_request_body(batch=True))
    async def submit_batch(request: Request, response: Response,
                           caller: CallerDep,
                           idempotency_key: str | None = Header(None, max_length=200)
                           ) -> BatchAccepted:
        """Submit many jobs in one call: validated together, all or none queued.
        ``Location`` is the first job; each job's own is in the body."""
        items = await parse_items(request, batch=True)
        ids, replayed = await run_in_threadpool(_submit, request, items, caller,
                                                idempotency_key)
        response.headers["Location"] = f"/v1/jobs/{ids[0]}"
        return BatchAccepted(replayed=replayed, jobs=[
            Accepted(id=i, status=JobStatus.QUEUED, location=f"/v1/jobs/{i}") for i in ids])

    _add_read_routes(app)


# -- reading, waiting, cancelling -------------------------------------------------------------

def _not_found(job_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no job {job_id!r}")


def _valid_id(job_id: str) -> str:
    try:
        uuid.UUID(job_id)
    except ValueError:  # not an id we could have issued; never reaches SQL
        raise _not_found(job_id) from None
    return job_id


def _job_or_404(client: Client, job_id: str, with_embedding: bool = True, *,
                owner: str | None) -> JobOut:
    """The job if ``owner`` may see it (None: anyone's). Another key's job is a 404,
    not a 403, so a key cannot even learn that an id exists."""
    job = client.get(_valid_id(job_id), with_embedding=with_embedding, owner=owner)
    if job is None:
        raise _not_found(job_id)
    return job_out(job)


def _status_or_404(client: Client, job_id: str, owner: str | None) -> str:
    """The job's status alone: what each turn of a long-poll needs to read."""
    with client.sessions() as sess:
        status = store.job_statuses(session=sess, job_ids=[_valid_id(job_id)],
                                    owner=owner).get(job_id)
    if status is None:
        raise _not_found(job_id)
    return status


def _cursor(job: JobOut) -> str:
    return store.encode_cursor(job.created_at, job.id)


def _after(cursor: str) -> tuple[datetime, str]:
    try:
        return store.decode_cursor(cursor)
    except ValueError:
        raise ApiError(422, "invalid_input", "cursor: not a cursor this API issued") from None


def _as_stored(d: datetime) -> datetime:
    """UTC, as the store keeps it; naive input is taken to be UTC."""
    try:
        return d.astimezone(UTC) if d.tzinfo else d.replace(tzinfo=UTC)
    except (OverflowError, ValueError):
        raise ApiError(422, "invalid_input", f"datetime out of range: {d}") from None


def _add_read_routes(app: FastAPI) -> None:
    read_errors = error_responses(401, 404, 422)

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses=read_errors)
    def get_job(request: Request, job_id: str, caller: CallerDep,
                embedding: bool = True) -> JobOut:
        """Status, timings, and the prediction once the job has succeeded."""
        return _job_or_404(request.app.state.client, job_id, embedding, owner=caller.scope)

    @app.get("/v1/jobs", response_model=JobPage, tags=["jobs"], responses=read_errors)
    def list_jobs(request: Request, caller: CallerDep, status: JobStatus | None = None,
                  modality: Modality | None = None, since: datetime | None = None,
                  limit: int = Query(100, ge=1, le=1000), cursor: str | None = None
                  ) -> JobPage:
        """The caller's jobs (an admin key: everyone's), newest first, without
        embeddings; follow ``next_cursor`` for older jobs."""
        client: Client = request.app.state.client
        with client.sessions() as sess:
            rows = store.list_jobs(session=sess, status=status and status.value,
                                   modality=modality and modality.value,
                                   since=since and _as_stored(since), limit=limit,
                                   before=_after(cursor) if cursor else None,
                                   owner=caller.scope)
            jobs = [job_out(j.as_dict()) for j in rows]
        return JobPage(jobs=jobs, next_cursor=_cursor(jobs[-1]) if len(jobs) == limit else None)

    @app.delete("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"],
                responses=error_responses(401, 404, 409))
    def cancel_job(request: Request, job_id: str, caller: CallerDep) -> JobOut:
        """Cancel a queued or running job: it is ``cancelled`` at once, a worker drops it
        from a batch that has not started, and a running attempt's outcome is discarded.
        409 once it has succeeded or failed; a cancelled job answers 200 again (a DELETE
        is idempotent)."""
        client: Client = request.app.state.client
        cancelled = client.cancel(_valid_id(job_id), owner=caller.scope)
        job = _job_or_404(client, job_id, with_embedding=False, owner=caller.scope)
        if not cancelled and job.status is not JobStatus.CANCELLED:
            raise ApiError(409, "not_cancellable", f"job {job_id} is {job.status.value}; "
                           "only queued or running jobs can be cancelled")
        return job

    @app.get("/v1/jobs/{job_id}/wait", response_model=JobOut, tags=["jobs"],
             responses=read_errors)
    async def wait_job(request: Request, job_id: str, caller: CallerDep,
                       timeout: float = Query(30.0, ge=0, description="seconds; capped by "
                                              "the server's MMQ_MAX_WAIT_S"),
                       embedding: bool = True) -> JobOut:
        """Long-poll: returns as soon as the job is terminal, or with its current
        status when ``timeout`` runs out, so a client needs no busy loop."""
        client: Client = request.app.state.client
        end = time.monotonic() + min(timeout, request.app.state.settings.max_wait_s)
        poll = 0.02
        while True:
            status = await run_in_threadpool(_status_or_404, client, job_id, caller.scope)
            if status in TERMINAL or time.monotonic() + poll > end:
                break
            await asyncio.sleep(poll)
            poll = min(poll * 1.5, 0.25)  # quick for fast jobs, cheap for slow ones
        return await run_in_threadpool(
            lambda: _job_or_404(client, job_id, embedding, owner=caller.scope))


# -- health and metrics -------------------------------------------------------------------------

def _add_service_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["service"])
    def healthz() -> dict:
        """The process is up (it checks nothing else)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["service"], responses=error_responses(503))
    def readyz(request: Request) -> JSONResponse:
        """Redis and the database answer: ready to take jobs."""
        checks = {}
        try:
            checks["redis"] = "ok" if request.app.state.redis.ping() else "no reply"
        except redis.RedisError as e:
            checks["redis"] = f"error: {e}"
        try:
            store.ping(request.app.state.client.engine)
            checks["database"] = "ok"
        except Exception as e:  # any driver error means not ready
            checks["database"] = f"error: {type(e).__name__}"
        if all(v == "ok" for v in checks.values()):
            return JSONResponse({"status": "ready", "checks": checks})
        return JSONResponse(ApiError(503, "unavailable", "not ready", details=checks).body(),
                            status_code=503)

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def metrics(request: Request) -> Response:
        """Prometheus: jobs by status and modality, queue depths, submit-to-result latency."""
        body, ctype = render_metrics(request.app.state.registry)
        return Response(body, media_type=ctype)

