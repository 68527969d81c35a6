"""``/v1/jobs``: submit jobs (JSON or multipart), read them, list them, wait for them,
cancel them. Submits go through the submit service (producer/web/submit.py), which
the page's form shares; reads go to SQL through the SDK's ``Client``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
from datetime import datetime

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from core import store
from core.config import Settings
from core.errors import InvalidInput
from core.jobs import TERMINAL, JobStatus, Modality
from core.params import check_instant
from producer.api.schemas import (
    Accepted,
    BatchAccepted,
    BatchIn,
    JobIn,
    JobOut,
    JobPage,
    error_responses,
    job_out,
    multipart_schema,
)
from producer.sdk import Client
from producer.web.auth import CallerDep
from producer.web.errors import ApiError
from producer.web.form import content_kind, read_body, upload_items
from producer.web.submit import submit

router = APIRouter()  # each route names its tag
submit_errors = error_responses(401, 409, 413, 415, 422, 429, 503)
read_errors = error_responses(401, 404, 422)


def _request_body(batch: bool) -> dict:
    model = "BatchIn" if batch else "JobIn"
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}},
        "multipart/form-data": {"schema": multipart_schema(batch)}}}}


# -- submitting -----------------------------------------------------------------------------

async def parse_items(request: Request, batch: bool) -> list[dict]:
    """The request's jobs as SDK items, from JSON or a multipart upload."""
    s: Settings = request.app.state.settings
    ctype = content_kind(request, "send application/json (text, or base64 data) or "
                         "multipart/form-data (image and audio files)")
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
        if batch and doc.get("webhook_url") is not None:  # the batch's, for items naming none
            for it in items:
                if it.get("webhook_url") is None:
                    it["webhook_url"] = doc["webhook_url"]
                    it["webhook_embedding"] = bool(doc.get("webhook_embedding") or False)
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
    if job.webhook_url is not None:
        item |= {"webhook_url": job.webhook_url, "webhook_embedding": job.webhook_embedding}
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


@router.post("/v1/jobs", status_code=202, response_model=Accepted, tags=["jobs"],
             responses=submit_errors, openapi_extra=_request_body(batch=False))
async def submit_job(request: Request, response: Response,
                     caller: CallerDep,
                     idempotency_key: str | None = Header(None, max_length=200)) -> Accepted:
    """Submit one job: JSON (text, or base64 data) or a multipart file upload. The
    same request again with the same ``Idempotency-Key`` queues nothing and gets the
    first answer again (``Idempotent-Replayed: true``): ``status`` queued, whatever the
    job did since; its state now is at ``Location``."""
    items = await parse_items(request, batch=False)
    ids, replayed = await run_in_threadpool(submit, request, items, caller,
                                            idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{ids[0]}"
    response.headers["Idempotent-Replayed"] = str(replayed).lower()
    return Accepted(id=ids[0], status=JobStatus.QUEUED, location=f"/v1/jobs/{ids[0]}")


@router.post("/v1/jobs:batch", status_code=202, response_model=BatchAccepted, tags=["jobs"],
             responses=submit_errors, openapi_extra=_request_body(batch=True))
async def submit_batch(request: Request, response: Response,
                       caller: CallerDep,
                       idempotency_key: str | None = Header(None, max_length=200)
                       ) -> BatchAccepted:
    """Submit many jobs in one call: validated together, all or none queued.
    ``Location`` is the first job; each job's own is in the body. A replay (the same
    ``Idempotency-Key`` and body) is the first answer again, as for ``POST /v1/jobs``,
    with ``replayed`` true."""
    items = await parse_items(request, batch=True)
    ids, replayed = await run_in_threadpool(submit, request, items, caller,
                                            idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{ids[0]}"
    response.headers["Idempotent-Replayed"] = str(replayed).lower()  # as POST /v1/jobs
    return BatchAccepted(replayed=replayed, jobs=[
        Accepted(id=i, status=JobStatus.QUEUED, location=f"/v1/jobs/{i}") for i in ids])


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
    """UTC, as the store keeps it; naive input is taken to be UTC (``check_instant``)."""
    try:
        return check_instant(d, "since")
    except InvalidInput as e:
        raise ApiError(422, "invalid_input", e.reason) from None


@router.get("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses=read_errors)
def get_job(request: Request, job_id: str, caller: CallerDep,
            embedding: bool = True) -> JobOut:
    """Status, timings, and the prediction once the job has succeeded."""
    return _job_or_404(request.app.state.client, job_id, embedding, owner=caller.scope)


@router.get("/v1/jobs", response_model=JobPage, tags=["jobs"], responses=read_errors)
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


@router.delete("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"],
               responses=error_responses(401, 404, 409))
def cancel_job(request: Request, job_id: str, caller: CallerDep) -> JobOut:
    """Cancel a queued or running job: it is ``cancelled`` at once, a worker drops it
    from a batch that has not started, and a running attempt's outcome is discarded.
    409 once it has succeeded or failed; a cancelled job answers 200 again (a DELETE
    is idempotent), as ``Client.cancel`` and ``mmq cancel`` succeed again."""
    client: Client = request.app.state.client
    cancelled = client.cancel(_valid_id(job_id), owner=caller.scope)
    job = _job_or_404(client, job_id, with_embedding=False, owner=caller.scope)
    if not cancelled:  # it succeeded or failed: final, so the status read is the reason
        raise ApiError(409, "not_cancellable", f"job {job_id} is {job.status.value}; "
                       "only queued or running jobs can be cancelled")
    return job


@router.get("/v1/jobs/{job_id}/wait", response_model=JobOut, tags=["jobs"],
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
