"""How the results page draws a page, and its error pages: the templates (Jinja2,
autoescaped), the headers every page carries, the request's sign-in, ``UiError`` (a
refusal, drawn as a page with its status) and the page's answer to a database error.
The routes are in routes.py; ``create_app`` registers the error pages as the app's
handlers (producer/api/app.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from core import store
from core.errors import brief_error
from producer.ui.session import COOKIE, PATH, Sessions, UiSession, same_origin
from producer.web.errors import RETRY_AFTER_S

log = logging.getLogger("mmq.api")
HERE = Path(__file__).parent
# The pages load nothing from elsewhere and run no inline script or style.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; media-src 'self'; "
                               "script-src 'self'; style-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",  # a key's results: not for shared caches or back buttons
}
STORE_DOWN = "The results store is not answering; try again in a moment."
STORE_DOWN_SUBMIT = ("The results store is not answering; nothing was submitted. Try "
                     "again in a moment.")
STORE_FAILED = ("Something went wrong on the server while reading or writing the "
                "results; it has been logged. Try again, or come back later.")

TEMPLATES = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True,
                        trim_blocks=True, lstrip_blocks=True)


class UiError(Exception):
    """A page-level refusal: rendered as a page with this status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def read_session(request: Request) -> UiSession | None:
    """The request's sign-in, or None. Reads the store: from async code, call it in the
    thread pool."""
    return request.app.state.ui_sessions.read(request.cookies.get(COOKIE))


def render(request: Request, template: str, session: UiSession | None, *, status: int = 200,
           **context: Any) -> HTMLResponse:
    sessions: Sessions = request.app.state.ui_sessions
    context.setdefault("error", None)
    context.setdefault("notice", None)
    context.setdefault("reload_ms", 0)  # ui.js reloads the page after this (0: never)
    context.setdefault("refresh_s", 0)  # without JavaScript: a meta refresh (0: none)
    html = TEMPLATES.get_template(template).render(
        prefix=PATH, session=session, caller=session.caller if session else None,
        csrf=sessions.csrf_token(session) if session else "", **context)
    return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)


async def ui_error_page(request: Request, e: UiError) -> HTMLResponse:
    """The app's handler for ``UiError`` (``create_app`` registers it)."""
    try:
        session = await run_in_threadpool(read_session, request)
    except SQLAlchemyError:  # the store is down (or failed): the error page still renders
        session = None
    return render(request, "error.html", session, status=e.status, error=e.message)


def is_page(request: Request) -> bool:
    """A request for the results page (``/ui`` and below), whose errors are pages."""
    path = request.url.path
    return path == PATH or path.startswith(f"{PATH}/")


async def store_error_page(request: Request, outage: bool) -> HTMLResponse:
    """A database error on the page (the app's database handler, which has logged it,
    sends those of ``/ui`` here): the page's error page with the API's status, 503 with
    Retry-After while the database does not answer, else 500, and a sentence for a
    person, never the error. During an outage the sign-in is not looked up (the store
    would keep the page waiting again), and the page offers no sign-in."""
    if not outage:
        return await ui_error_page(request, UiError(500, STORE_FAILED))
    r = render(request, "error.html", None, status=503, error=STORE_DOWN, store_down=True)
    r.headers["Retry-After"] = str(RETRY_AFTER_S)
    return r


def signed_form_session(request: Request, csrf: object) -> UiSession | None:
    """The session of a POST from this page, as far as the cookie's signature and the
    form's CSRF token prove without the store (which is down): a sign-in that ended
    (signed out, expired) still passes, so it is only good for showing a form back."""
    sessions: Sessions = request.app.state.ui_sessions
    session = sessions.signed(request.cookies.get(COOKIE))
    if session is None or not same_origin(request) or not sessions.csrf_ok(session, csrf):
        return None
    return session


def store_down_form(request: Request, e: SQLAlchemyError, csrf: object, template: str,
                    message: str, **context: Any) -> HTMLResponse | None:
    """A form POST that met a database outage (the sign-in's lookup or the write),
    drawn again with what was sent in it (the route passes that in ``context``) and
    ``message``: 503 with Retry-After, as the error page would be, but without losing
    a person's typing. None (the app's error page) for any other database error, or a
    POST that no page of a sign-in made. Logged as the app's handler logs an outage."""
    if not store.unreachable(e):
        return None
    session = signed_form_session(request, csrf)
    if session is None:
        return None
    log.warning("the results store is unreachable: %s", brief_error(e))
    r = render(request, template, session, status=503, error=message, **context)
    r.headers["Retry-After"] = str(RETRY_AFTER_S)
    return r
