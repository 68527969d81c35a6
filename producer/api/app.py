"""The HTTP API's app factory: submit jobs, read them, wait for them, cancel them.

``mmq api`` serves ``create_app()`` with uvicorn. Each resource is an ``APIRouter``
of its own module (``ROUTERS`` below, the results page's included); this module sets
the app's state, its one error shape and its published schemas. Every ``/v1`` route needs
``Authorization: Bearer <key>`` (keys from ``MMQ_API_KEYS``; see
``producer/web/auth.py``), and a key sees only the jobs it made. The API is a
producer like the SDK: it validates, writes job rows and sends task messages
through ``producer.sdk.Client``, and reads results from SQL. Blocking database
and Redis calls run in the thread pool; only the long-poll sleeps on the loop.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import store
from core.broker.redis_client import redis_for
from core.config import Settings, get_settings
from core.errors import brief_error, brief_traceback
from core.webhooks.deliver import start_delivery
from producer.api import corrections, events, jobs, openai, search, service, versions
from producer.api.metrics import metrics_registry
from producer.api.schemas import BatchIn, JobIn
from producer.api.search import SearchIn
from producer.sdk import Client
from producer.ui import UiError, is_page, store_error_page, ui_error_page
from producer.ui import router as ui_router
from producer.ui.session import Sessions
from producer.web.auth import keyring
from producer.web.errors import ERROR_CODES, RETRY_AFTER_S, ApiError

log = logging.getLogger("mmq.api")

# Every route, in the order they are matched: one APIRouter per resource.
ROUTERS = (
    jobs.router,      # /v1/jobs, /v1/jobs:batch, /v1/jobs/{id}[/wait] (producer/api/jobs.py)
    corrections.router,  # /v1/jobs/{id}/correction (producer/api/corrections.py)
    events.router,    # /v1/jobs/{id}/events, /v1/jobs:events, /v1/jobs/{id}/webhooks
    service.router,   # /healthz, /readyz, /metrics (producer/api/service.py)
    versions.router,  # /v1/models (producer/api/versions.py)
    search.router,    # POST /v1/search (producer/api/search.py)
    openai.router,    # /v1/embeddings, /v1/audio/transcriptions (producer/api/openai.py)
    ui_router,        # the results page, /ui (producer/ui/routes.py)
)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """The webhook delivery thread runs while the app serves (core/webhooks/deliver.py:
    every API and worker process delivers, so either kind alone keeps events moving)."""
    deliverer = start_delivery(app.state.client.sessions, app.state.settings)
    try:
        yield
    finally:
        if deliverer is not None:
            deliverer.stop()


def create_app(settings: Settings | None = None, client: Client | None = None) -> FastAPI:
    s = settings or get_settings()
    app = FastAPI(title="mmq", version="1", summary="Asynchronous multimodal inference jobs",
                  description="Submit text, image and audio jobs; read their predictions.",
                  lifespan=_lifespan)
    app.state.settings = s
    app.state.client = client or Client(settings=s)
    app.state.redis = redis_for(s, socket_timeout=2, socket_connect_timeout=2)
    app.state.registry = metrics_registry(s, app.state.client, app.state.redis)
    app.state.keyring = keyring(s)  # a malformed key entry stops start-up here
    if not app.state.keyring:
        log.warning("no API keys configured (MMQ_API_KEYS): every /v1 request gets 401")
    # The page's sign-ins, under the same keys (producer/ui/session.py).
    app.state.ui_sessions = Sessions(s, app.state.keyring, app.state.client.sessions)
    _install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    _publish_schemas(app, JobIn, BatchIn, SearchIn, openai.EmbeddingsIn)
    return app


# -- errors ---------------------------------------------------------------------------------

def _install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(UiError, ui_error_page)  # the page's refusals: an error page

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

    @app.exception_handler(SQLAlchemyError)  # DBAPIError, and StatementError besides
    async def _database(req: Request, e: SQLAlchemyError) -> Response:
        # Its own handler, not the catch-all below: Starlette re-raises what reaches
        # that one after answering, and uvicorn then drops the client's keep-alive
        # connection (the next request on it failed with a read error) and logs the
        # whole error, SQL statement and parameters included.
        # The results page answers with a page of its own, the same status (producer/ui).
        if store.unreachable(e):  # an outage, not a bug: the client should come back
            log.warning("the results store is unreachable: %s", brief_error(e))
            if is_page(req):
                return await store_error_page(req, outage=True)
            return JSONResponse(ApiError(503, "unavailable", "the results store (database) "
                                         "is unreachable; retry later").body(),
                                status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        # A bug: where it happened, but not SQLAlchemy's message, which carries the
        # statement and its parameters (a user's text, a query).
        log.error("database error: %s\n%s", brief_error(e), brief_traceback(e))
        if is_page(req):
            return await store_error_page(req, outage=False)
        return JSONResponse(ApiError(500, "internal", f"internal error: "
                                     f"{type(e).__name__}").body(), status_code=500)

    @app.exception_handler(Exception)
    async def _internal(_req: Request, e: Exception) -> JSONResponse:
        # Not log.exception: an error raised while handling a database error carries
        # it in its chain, and the chain would print its statement and parameters.
        log.error("unhandled error: %s\n%s", brief_error(e), brief_traceback(e))
        # Starlette re-raises ``e`` after this answer and uvicorn logs it whole: only
        # ``e`` itself there, its chain (logged briefly just above) cut off.
        e.__cause__, e.__context__, e.__suppress_context__ = None, None, True
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


