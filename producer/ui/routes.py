"""The results page, ``/ui``: the jobs a key made, live, with their inputs and results;
search; a submit form. Served by the API process (``router``, which the API's app factory
includes), server-rendered with Jinja2 (autoescaped: pages.py draws a page, and the
error page of a ``UiError``); a little plain JavaScript (``static/ui.js``) follows the pending
jobs' statuses as Server-Sent Events (live.py), reloads a pending job's page when it
changes and takes dropped files, and every page works without it.

Who sees what: the sign-in takes an API key and keeps a signed session cookie
(``producer/ui/session.py``); from then on the page reads exactly what that key reads
through ``/v1`` (its own jobs; an admin key everyone's). Every POST carries a CSRF
token tied to the session. Reads and submits go through the same store functions and
the same ``Client`` and submit service (producer/web/submit.py) as the API, in the
thread pool; bad input is a 4xx page that says
what was wrong, never a 500.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import InvalidInput
from core.inputs import AUDIO_FORMATS_TEXT, sniff_modality
from core.jobs import MODALITIES, TASKS, JobStatus
from producer.ui import data as ui_data
from producer.ui.live import row_stream
from producer.ui.pages import (
    HERE,
    STORE_DOWN_SUBMIT,
    TEMPLATES,
    UiError,
    read_session,
    render,
    store_down_form,
)
from producer.ui.session import PATH, Sessions, UiSession, same_origin
from producer.web import corrections as web_corrections
from producer.web.errors import INPUT_STATUS, ApiError
from producer.web.form import read_body
from producer.web.submit import submit as submit_jobs  # the form refuses what /v1/jobs refuses

STATUSES = tuple(s.value for s in JobStatus)
SIGNIN_BODY_BYTES = 16 * 1024  # a key and a path
MAX_SEARCH_K = 100
WHOLE = re.compile(r"[0-9]{1,9}")  # str.isdigit() also takes "²", which int() refuses

router = APIRouter(prefix=PATH, include_in_schema=False)
# A mount is not given the router's prefix (only its routes are): the whole path.
router.mount(f"{PATH}/static", StaticFiles(directory=HERE / "static"), name="ui-static")


# -- helpers -------------------------------------------------------------------------------

def _to_signin(request: Request) -> RedirectResponse:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"{PATH}/signin?{urlencode({'next': here})}", status_code=303)


def _safe_next(target: str | None) -> str:
    """Only a path on this page: never another site (an open redirect)."""
    if (target and target.startswith(f"{PATH}/") and not target.startswith("//")
            and "\\" not in target and "\n" not in target and "\r" not in target):
        return target
    return f"{PATH}/jobs"


def _choice(request: Request, name: str, allowed: tuple[str, ...]) -> str | None:
    value = request.query_params.get(name) or None
    if value is not None and value not in allowed:
        raise UiError(422, f"{name}: {value!r} is not one of {', '.join(allowed)}")
    return value


def _filters(request: Request) -> dict[str, str | None]:
    return {"modality": _choice(request, "modality", MODALITIES),
            "status": _choice(request, "status", STATUSES),
            "task": _choice(request, "task", TASKS)}


async def _form(request: Request, limit: int) -> FormData:
    """The POSTed form, size-capped like the API's uploads; a 4xx page when unreadable."""
    s = request.app.state.settings
    try:
        request._body = await read_body(request, limit)  # what request.form() parses
        return await request.form(max_files=s.max_batch_items, max_fields=64)
    except ApiError as e:
        raise UiError(e.status, e.message) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise UiError(422, f"unreadable form: {e}") from None
    except StarletteHTTPException as e:  # Starlette refused the form (too many files, ...)
        raise UiError(413 if "Too many" in str(e.detail) else 422,
                      f"unreadable form: {e.detail}") from None


async def _posted_by_page(request: Request, form: FormData) -> UiSession:
    """The session of a POST that came from this page: signed in, same origin, and the
    form's CSRF token belongs to this sign-in."""
    session = await run_in_threadpool(read_session, request)
    if session is None:
        raise UiError(401, "Your session has ended; sign in again.")
    if not same_origin(request) or not request.app.state.ui_sessions.csrf_ok(
            session, form.get("csrf")):
        raise UiError(403, "This form is out of date or did not come from this page; "
                      "reload the page and try again.")
    return session


def _valid_id(job_id: str) -> str:
    try:
        uuid.UUID(job_id)
    except ValueError:  # not an id we could have issued; never reaches SQL
        raise UiError(404, f"No job {job_id!r}.") from None
    return job_id


def _api_error(e: ApiError | InvalidInput) -> UiError:
    if isinstance(e, InvalidInput):
        return UiError(INPUT_STATUS.get(e.kind, 422), str(e))
    return UiError(e.status, e.message)


# -- signing in and out ----------------------------------------------------------------------

@router.get("")
@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse(f"{PATH}/jobs", status_code=303)


@router.get("/signin")
def signin_page(request: Request, next: str | None = None) -> Response:
    if read_session(request) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return render(request, "signin.html", None, next=_safe_next(next))


@router.post("/signin")
async def signin(request: Request) -> Response:
    form = await _form(request, SIGNIN_BODY_BYTES)
    target = _safe_next(str(form.get("next") or ""))
    if not same_origin(request):  # a sign-in forced by another site (login CSRF)
        raise UiError(403, "This sign-in did not come from this page.")
    sessions: Sessions = request.app.state.ui_sessions
    caller = sessions.caller_for_key(str(form.get("key") or ""))
    if caller is None:
        return render(request, "signin.html", None, status=401, next=target,
                      error="That key is not accepted here. Use an API key from "
                            "MMQ_API_KEYS or MMQ_ADMIN_KEYS.")
    response = RedirectResponse(target, status_code=303)
    sessions.set_cookie(response, await run_in_threadpool(sessions.issue, caller))
    return response


@router.post("/signout")
async def signout(request: Request) -> Response:
    form = await _form(request, SIGNIN_BODY_BYTES)
    session = await _posted_by_page(request, form)
    # Ended in the store, not only in this browser: a copy of the cookie is refused too.
    await run_in_threadpool(request.app.state.ui_sessions.revoke, session)
    response = RedirectResponse(f"{PATH}/signin", status_code=303)
    request.app.state.ui_sessions.clear_cookie(response)
    return response


# -- jobs -------------------------------------------------------------------------------

def _page_of_jobs(request: Request, session: UiSession) -> dict[str, Any]:
    filters = _filters(request)
    before = None
    if cursor := request.query_params.get("before"):
        try:
            before = ui_data.parse_cursor(cursor)
        except ValueError as e:
            raise UiError(422, f"before: {e}") from None
    size = request.app.state.settings.ui_page_size
    jobs = ui_data.list_views(request.app.state.client.sessions, owner=session.caller.scope,
                              before=before, limit=size + 1, **filters)
    more = len(jobs) > size
    jobs = jobs[:size]
    query = {k: v for k, v in filters.items() if v}
    return {"jobs": jobs, "filters": filters, "query": urlencode(query),
            "older": urlencode({**query, "before": ui_data.cursor_of(jobs[-1])})
            if more else None, "paged": before is not None}


@router.get("/jobs")
def jobs_page(request: Request) -> Response:
    session = read_session(request)
    if session is None:
        return _to_signin(request)
    page = _page_of_jobs(request, session)
    submitted = request.query_params.get("submitted", "")
    notice = (f"Submitted {submitted} job{'s' if submitted != '1' else ''}."
              if WHOLE.fullmatch(submitted) else None)
    pending = [j.id for j in page["jobs"] if j.pending]
    every = request.app.state.settings.ui_refresh_s
    return render(request, "jobs.html", session, notice=notice, pending=bool(pending),
                  events=f"{PATH}/jobs/events?{urlencode({'ids': ','.join(pending)})}"
                  if pending and not page["paged"] else None,
                  refresh_s=max(1, round(every * 2)) if pending and not page["paged"] else 0,
                  modalities=MODALITIES, statuses=STATUSES, tasks=TASKS, **page)


@router.get("/jobs/rows")
def jobs_rows(request: Request) -> Response:
    """The job list's rows alone (the list without its page around it)."""
    session = read_session(request)
    if session is None:
        return PlainTextResponse("signed out", status_code=401)
    page = _page_of_jobs(request, session)
    return render(request, "_rows.html", session, jobs=page["jobs"])


@router.get("/jobs/events")
def jobs_events(request: Request, ids: str = "") -> Response:
    """The page's pending jobs as Server-Sent Events of their rows (producer/ui/live.py):
    what ui.js listens to instead of polling."""
    session = read_session(request)
    if session is None:
        return PlainTextResponse("signed out", status_code=401)
    template = TEMPLATES.get_template("_rows.html")
    return row_stream(request, ids, session.caller.scope,
                      lambda view: template.render(prefix=PATH, jobs=[view]))


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str) -> Response:
    session = read_session(request)
    if session is None:
        return _to_signin(request)
    job = ui_data.job_view(request.app.state.client.sessions, _valid_id(job_id),
                           owner=session.caller.scope)
    if job is None:  # another key's job looks like no job, as in the API
        raise UiError(404, f"No job {job_id!r}.")
    every = request.app.state.settings.ui_refresh_s if job.pending else 0
    may_correct = job.correctable and web_corrections.may_correct(session.caller, job.owner)
    hooks = ui_data.webhooks(request.app.state.client.sessions, job.id)
    return render(request, "job.html", session, job=job, reload_ms=int(every * 1000),
                  refresh_s=max(1, round(every * 2)) if every else 0,
                  may_correct=may_correct, notice=_job_notice(request, job), webhooks=hooks)


def _job_notice(request: Request, job: ui_data.JobView) -> str | None:
    """What the form that led here did (``?corrected=1``, ``?cancelled=1|0``), said only
    where the job's state bears it out: a reload or a made-up link claims nothing."""
    q = request.query_params
    if job.correction and q.get("corrected"):
        return f"Corrected: the right label is {job.correction['label']!r}."
    cancelled = q.get("cancelled")
    if cancelled == "1" and job.status == JobStatus.CANCELLED.value:
        return "Cancelled."
    if cancelled == "0" and job.status in (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value):
        return (f"It had already finished ({job.status}) before the cancel arrived: "
                "nothing was cancelled.")
    return None


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str) -> Response:
    """The page's cancel button: the API's DELETE, for the signed-in key's own job (a
    queued or running one; a finished job is left as it is). The job's page then says
    which: ``Client.cancel``'s answer travels in the redirect (``?cancelled=1|0``)."""
    form = await _form(request, SIGNIN_BODY_BYTES)
    session = await _posted_by_page(request, form)
    client = request.app.state.client
    done = await run_in_threadpool(client.cancel, _valid_id(job_id),
                                   owner=session.caller.scope)
    return RedirectResponse(f"{PATH}/jobs/{job_id}?cancelled={int(done)}", status_code=303)


@router.post("/jobs/{job_id}/correct")
async def correct_job(request: Request, job_id: str) -> Response:
    """The job page's "right label" form: one of the job's labels (``choice``) or a new
    one (``new_label``, which wins when filled in), recorded as the job's correction
    under the API's rule (producer/web/corrections.py: only the key that made it)."""
    form = await _form(request, SIGNIN_BODY_BYTES)
    session = await _posted_by_page(request, form)
    label = str(form.get("new_label") or "").strip() or str(form.get("choice") or "")
    try:
        await run_in_threadpool(web_corrections.correct, request.app.state.client.sessions,
                                request.app.state.settings, session.caller,
                                _valid_id(job_id), label, "ui")
    except (ApiError, InvalidInput) as e:
        raise _api_error(e) from None
    return RedirectResponse(f"{PATH}/jobs/{job_id}?corrected=1", status_code=303)


@router.get("/jobs/{job_id}/input")
def job_input(request: Request, job_id: str) -> Response:
    """The job's image or audio bytes, for the page's <img> and <audio>, under the same
    owner check as the job itself."""
    session = read_session(request)
    if session is None:
        return PlainTextResponse("signed out", status_code=401)
    found = ui_data.job_input(request.app.state.client.sessions, _valid_id(job_id),
                              owner=session.caller.scope)
    if found is None:
        return PlainTextResponse("no such input", status_code=404)
    data, media_type = found
    return Response(data, media_type=media_type, headers={
        # The bytes of a job never change; the browser may keep them, nobody else.
        "Cache-Control": "private, max-age=3600",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
    })


# -- submitting ---------------------------------------------------------------------------------

@router.get("/submit")
def submit_page(request: Request) -> Response:
    session = read_session(request)
    if session is None:
        return _to_signin(request)
    return render(request, "submit.html", session, tasks=TASKS, form={})


@router.post("/submit")
async def submit(request: Request) -> Response:
    s = request.app.state.settings
    form = await _form(request, s.max_request_bytes)
    kept = {k: str(form.get(k) or "") for k in ("text", "task", "labels", "top_k")}
    try:
        session = await _posted_by_page(request, form)
    except SQLAlchemyError as e:
        if (page := _store_down_form(request, form, kept, e)) is None:
            raise  # the app's database handler: the page's 503 or 500
        return page
    try:
        items = await _submit_items(form, s)
        ids, _ = await run_in_threadpool(submit_jobs, request, items, session.caller, None)
    except (ApiError, InvalidInput, UiError) as e:
        err = e if isinstance(e, UiError) else _api_error(e)
        return render(request, "submit.html", session, status=err.status, error=err.message,
                      tasks=TASKS, form=kept)
    except SQLAlchemyError as e:
        if (page := _store_down_form(request, form, kept, e)) is None:
            raise
        return page
    return RedirectResponse(f"{PATH}/jobs?submitted={len(ids)}", status_code=303)


def _store_down_form(request: Request, form: FormData, kept: dict[str, str],
                     e: SQLAlchemyError) -> Response | None:
    # The form again, what was typed kept, as a Redis outage keeps it (the error page
    # lost it); None (the app's error page) for any other database error.
    return store_down_form(request, e, form.get("csrf"), "submit.html", STORE_DOWN_SUBMIT,
                           tasks=TASKS, form=kept)


async def _submit_items(form: FormData, s) -> list[dict]:
    """SDK items from the form: each uploaded file (image or audio, by its bytes) and
    the text box, all with the form's task, labels and top_k."""
    task = str(form.get("task") or "embed")
    common: dict[str, Any] = {"task": task}
    if task == "classify":
        labels = [p.strip() for p in str(form.get("labels") or "").split(",") if p.strip()]
        common["labels"] = labels or None
    top_k = str(form.get("top_k") or "").strip()
    if top_k:
        if not WHOLE.fullmatch(top_k):
            raise UiError(422, f"top_k: not a whole number: {top_k!r}")
        common["top_k"] = int(top_k)
    items = []
    for f in form.getlist("files"):
        if not isinstance(f, UploadFile):
            continue
        data = await f.read()
        if not data:  # the file input left empty sends an empty part
            continue
        if len(data) > s.max_payload_bytes:
            raise UiError(413, f"{f.filename or 'a file'}: {len(data)} bytes, over the limit "
                          f"of {s.max_payload_bytes}")
        try:
            modality = sniff_modality(data, len(items))
        except InvalidInput:
            raise UiError(415, f"{f.filename or 'a file'}: not an image or audio file this "
                          f"service reads (images: PNG, JPEG, ...; audio: {AUDIO_FORMATS_TEXT})"
                          ) from None
        items.append({**common, "modality": modality, "input": data})
    text = str(form.get("text") or "")
    if text.strip():
        items.append({**common, "modality": "text", "input": text})
    if not items:
        raise UiError(422, "Nothing to submit: drop or choose a file, or type a text.")
    if len(items) > s.max_batch_items:
        raise UiError(413, f"{len(items)} items, over the limit of {s.max_batch_items}")
    return items


# -- search ------------------------------------------------------------------------------------

SEARCH_FILTERS = ("modality", "task", "label", "model_version", "created_since",
                  "created_until")


@router.get("/search")
async def search_page(request: Request) -> Response:
    session = await run_in_threadpool(read_session, request)
    if session is None:
        return _to_signin(request)
    params = dict(request.query_params)
    query = params.get("q", "")
    if not query.strip():
        return render(request, "search.html", session, params=params, results=None,
                      modalities=MODALITIES, tasks=TASKS)
    return await _search(request, session, query, params, "text")


@router.post("/search")
async def search_by_file(request: Request) -> Response:
    """Search with an image or a clip as the query (a multipart form)."""
    s = request.app.state.settings
    form = await _form(request, s.max_request_bytes)
    session = await _posted_by_page(request, form)
    params = {k: str(v) for k, v in form.multi_items() if isinstance(v, str) and k != "csrf"}
    upload = form.get("file")
    data = await upload.read() if isinstance(upload, UploadFile) else b""
    if not data:
        raise UiError(422, "Choose an image or audio file to search with.")
    try:
        kind = sniff_modality(data, 0)
    except InvalidInput as e:
        raise UiError(415, str(e)) from None
    return await _search(request, session, data, params, kind)


async def _search(request: Request, session: UiSession, query: str | bytes,
                  params: dict[str, str], kind: str) -> Response:
    client = request.app.state.client
    search = getattr(client, "search", None)
    if search is None:
        raise UiError(501, "Search is not available on this server: its Client has no "
                      "search (POST /v1/search).")
    k = _search_k(params.get("k"))
    filters = _search_filters(params)
    try:
        hits = await run_in_threadpool(
            lambda: search(query, k=k, owner=session.caller.scope, **filters))
    except (ApiError, InvalidInput) as e:
        raise _api_error(e) from None
    except RuntimeError as e:  # Client.search's SearchUnavailable: no worker embedded
        raise UiError(503, f"Search could not run now: {e}. Try again shortly.") from None
    views = await run_in_threadpool(ui_data.views_by_id, client.sessions,
                                    [str(h["id"]) for h in hits], owner=session.caller.scope)
    results = []
    for h in hits:  # best first, as the search ranked them
        v = views.get(str(h["id"]))
        if v is not None:
            v.score, v.summary = float(h.get("score", 0.0)), h.get("summary")
            results.append(v)
    return render(request, "search.html", session, params=params, results=results,
                  query_kind=kind, modalities=MODALITIES, tasks=TASKS)


def _search_k(raw: str | None) -> int:
    if not raw:
        return 10
    if not WHOLE.fullmatch(raw.strip()) or not 1 <= int(raw) <= MAX_SEARCH_K:
        raise UiError(422, f"k: a whole number from 1 to {MAX_SEARCH_K}, got {raw!r}")
    return int(raw)


def _search_filters(params: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in SEARCH_FILTERS:
        value = (params.get(name) or "").strip()
        if not value:
            continue
        if name == "modality" and value not in MODALITIES:
            raise UiError(422, f"modality: {value!r} is not one of {', '.join(MODALITIES)}")
        if name == "task" and value not in TASKS:
            raise UiError(422, f"task: {value!r} is not one of {', '.join(TASKS)}")
        if name.startswith("created_"):
            try:
                when = datetime.fromisoformat(value)
                out[name] = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
            except (ValueError, OverflowError):  # "0001-01-01T00:00+14:00" overflows
                raise UiError(422, f"{name}: not a date (YYYY-MM-DD): {value!r}") from None
            continue
        out[name] = value
    return out
