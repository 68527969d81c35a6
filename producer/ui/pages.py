"""How the results page draws a page, and its error page: the templates (Jinja2,
autoescaped), the headers every page carries, the request's sign-in and ``UiError`` (a
refusal, drawn as a page with its status). The routes are in routes.py; ``create_app``
registers the error page as the app's handler for ``UiError`` (producer/api/app.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from producer.ui.session import COOKIE, PATH, Sessions, UiSession

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
    except DBAPIError:  # the store is down: the error page still renders
        session = None
    return render(request, "error.html", session, status=e.status, error=e.message)

