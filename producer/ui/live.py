"""The results page's live statuses: ``/ui/jobs/events?ids=`` streams the page's
pending jobs as Server-Sent Events (producer/web/events.py, the stream the API's
``/v1/jobs/{id}/events`` sends too), each a ``row`` event whose data is the job's
table row, rendered as the list renders it, so ui.js swaps the row in place. Signed-in
key's jobs only; without scripts the pages refresh themselves instead."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from core import store
from producer.ui.data import job_view
from producer.web.events import HEADERS, MAX_IDS, State, job_events, sse


def _valid(ids: str) -> list[str]:
    import uuid

    out = []
    for i in dict.fromkeys(p.strip() for p in ids.split(",") if p.strip()):
        try:
            uuid.UUID(i)
        except ValueError:
            continue  # not an id this site issued: nothing to stream
        out.append(i)
    return out[:MAX_IDS]


def row_stream(request: Request, ids: str, owner: str | None, render_row) -> StreamingResponse:
    """``render_row(view) -> html`` draws one row (pages.py holds the templates)."""
    sessions = request.app.state.client.sessions

    def read(pending: list[str]) -> dict[str, State]:
        with sessions() as s:
            return store.job_states(session=s, job_ids=pending, owner=owner)

    async def render(job_id: str, status: str, state: State) -> str:
        view = await run_in_threadpool(job_view, sessions, job_id, owner=owner)
        if view is not None and view.status != status:  # an earlier state, told late:
            view.status = status  # the row as it was then (its result comes with the last)
            view.labels, view.transcript, view.dim, view.error = [], None, None, None
        return sse("row", render_row(view) if view is not None else "", f"{job_id}:{status}")

    return StreamingResponse(
        job_events(read, _valid(ids), render=render,
                   max_s=request.app.state.settings.events_max_s),
        media_type="text/event-stream", headers=HEADERS)
