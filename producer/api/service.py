"""The service routes, outside ``/v1`` and without a key: ``/healthz`` (the process is
up), ``/readyz`` (Redis and the database answer), ``/metrics`` (Prometheus,
producer/api/metrics.py)."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from core import store
from producer.api.metrics import render_metrics
from producer.api.schemas import error_responses
from producer.web.errors import ApiError

router = APIRouter()  # each route names its tag


@router.get("/healthz", tags=["service"])
def healthz() -> dict:
    """The process is up (it checks nothing else)."""
    return {"status": "ok"}


@router.get("/readyz", tags=["service"], responses=error_responses(503))
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


@router.get("/metrics", tags=["service"], response_class=PlainTextResponse)
def metrics(request: Request) -> Response:
    """Prometheus: jobs by status and modality, queue depths, submit-to-result latency."""
    body, ctype = render_metrics(request.app.state.registry)
    return Response(body, media_type=ctype)
