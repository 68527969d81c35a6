"""``GET /v1/jobs/{id}/events`` and ``GET /v1/jobs:events?ids=``: Server-Sent Events of
jobs' status changes, ending when every job is terminal (producer/web/events.py);
``GET /v1/jobs/{id}/webhooks``: the job's webhook deliveries and their attempts.

Every event is ``event: status``. A job's ``queued`` and ``running`` events carry
``{"id", "status", "attempts"}``; its final one (``succeeded``, ``failed`` or
``cancelled``) carries the whole job as ``GET /v1/jobs/{id}`` returns it, with the
prediction (the embedding only with ``?embedding=true``). Same keys and ownership as
the other job routes: another key's job is a 404.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from core import store
from core.jobs import TERMINAL
from producer.api.jobs import _job_or_404, _not_found, _valid_id, read_errors
from producer.api.schemas import WebhooksOut
from producer.sdk import Client
from producer.web.auth import CallerDep
from producer.web.errors import ApiError
from producer.web.events import HEADERS, MAX_IDS, State, job_events, sse

router = APIRouter()
STREAM = {200: {"description": "text/event-stream: one `status` event per change",
                "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def _states(client: Client, ids: list[str], owner: str | None) -> dict[str, State]:
    with client.sessions() as s:
        return store.job_states(session=s, job_ids=ids, owner=owner)


async def _stream(request: Request, ids: list[str], owner: str | None,
                  embedding: bool) -> StreamingResponse:
    client: Client = request.app.state.client
    found = await run_in_threadpool(_states, client, ids, owner)
    missing = [i for i in ids if i not in found]
    if missing:  # before the stream starts: a plain 404, as the other job routes answer
        raise _not_found(missing[0])

    async def render(job_id: str, status: str, state: State) -> str:
        if status in TERMINAL:
            job = await run_in_threadpool(_job_or_404, client, job_id, embedding,
                                          owner=owner)
            return sse("status", job.model_dump_json(), f"{job_id}:{status}")
        return sse("status", json.dumps({"id": job_id, "status": status,
                                         "attempts": state[1]}),
                   f"{job_id}:{status}:{state[1]}")

    read = lambda pending: _states(client, pending, owner)  # noqa: E731
    return StreamingResponse(
        job_events(read, ids, render=render, max_s=request.app.state.settings.events_max_s),
        media_type="text/event-stream", headers=HEADERS)


@router.get("/v1/jobs/{job_id}/events", tags=["jobs"], responses={**STREAM, **read_errors},
            response_class=StreamingResponse)
async def job_events_route(request: Request, job_id: str, caller: CallerDep,
                           embedding: bool = False) -> StreamingResponse:
    """Server-Sent Events: the job's status changes (queued, running, then its final
    status with the whole job), ending when it is terminal."""
    return await _stream(request, [_valid_id(job_id)], caller.scope, embedding)


@router.get("/v1/jobs:events", tags=["jobs"], responses={**STREAM, **read_errors},
            response_class=StreamingResponse)
async def jobs_events_route(request: Request, caller: CallerDep,
                            ids: str = Query(description="comma-separated job ids, at "
                                             f"most {MAX_IDS}"),
                            embedding: bool = False) -> StreamingResponse:
    """Server-Sent Events of several jobs, interleaved; each event names its job. Ends
    when every one is terminal."""
    wanted = list(dict.fromkeys(i.strip() for i in ids.split(",") if i.strip()))
    if not wanted or len(wanted) > MAX_IDS:
        raise ApiError(422, "invalid_input", f"ids: 1 to {MAX_IDS} job ids, comma-separated")
    return await _stream(request, [_valid_id(i) for i in wanted], caller.scope, embedding)


@router.get("/v1/jobs/{job_id}/webhooks", response_model=WebhooksOut, tags=["jobs"],
            responses=read_errors)
def job_webhooks(request: Request, job_id: str, caller: CallerDep) -> WebhooksOut:
    """The job's webhook deliveries: status (pending, delivered, failed), the
    ``webhook-id``, and every attempt with its HTTP status or error."""
    client: Client = request.app.state.client
    with client.sessions() as s:
        if store.get_job(session=s, job_id=_valid_id(job_id), owner=caller.scope) is None:
            raise _not_found(job_id)
        return WebhooksOut(webhooks=store.job_webhooks(session=s, job_id=job_id))
