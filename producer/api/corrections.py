"""``/v1/jobs/{id}/correction``: the right label of a finished classify job, marked by
the key that made it; ``mmq train MODALITY --from-corrections`` learns from them.

    PUT    /v1/jobs/{id}/correction   {"label": "cat"}  -> the correction
    GET    /v1/jobs/{id}/correction                     -> the correction, or 404
    DELETE /v1/jobs/{id}/correction                     -> 204 (withdrawn)

One correction per job: a PUT replaces the one before. 404: no such job (or another
key's); 403: an admin key correcting a job another key made; 409: not a classify job,
or it has not succeeded; 422: a bad label. Who may correct is
producer/web/corrections.py's rule, the results page's too.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from core.errors import InvalidInput
from producer.api.jobs import _not_found, _valid_id
from producer.api.schemas import error_responses
from producer.web import corrections
from producer.web.auth import CallerDep
from producer.web.errors import INPUT_STATUS, ApiError


class CorrectionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(description="the job's right label: one of its labels or a new one")


class CorrectionOut(BaseModel):
    job_id: str
    label: str
    predicted: str | None = Field(None, description="the job's top label when corrected")
    corrected_by: str = Field(description="the key id that corrected it")
    via: str = Field(description="ui, api or sdk")
    corrected_at: datetime = Field(description="the database server's clock")


router = APIRouter()


@router.put("/v1/jobs/{job_id}/correction", response_model=CorrectionOut,
            tags=["corrections"], responses=error_responses(401, 403, 404, 409, 422))
async def put_correction(request: Request, job_id: str, body: CorrectionIn,
                         caller: CallerDep) -> CorrectionOut:
    """Mark the right label of a classify job that succeeded (replacing any earlier
    correction): training data for ``mmq train MODALITY --from-corrections``."""
    client = request.app.state.client
    try:
        out = await run_in_threadpool(corrections.correct, client.sessions,
                                      request.app.state.settings, caller, _valid_id(job_id),
                                      body.label, "api")
    except InvalidInput as e:
        raise ApiError(INPUT_STATUS.get(e.kind, 422), "invalid_input", f"label: {e}") from None
    return CorrectionOut(**out)


@router.get("/v1/jobs/{job_id}/correction", response_model=CorrectionOut,
            tags=["corrections"], responses=error_responses(401, 404))
def get_correction(request: Request, job_id: str, caller: CallerDep) -> CorrectionOut:
    out = corrections.correction_of(request.app.state.client.sessions, caller,
                                    _valid_id(job_id))
    if out is None:
        raise ApiError(404, "not_found", f"job {job_id} has no correction")
    return CorrectionOut(**out)


@router.delete("/v1/jobs/{job_id}/correction", status_code=204, tags=["corrections"],
               responses=error_responses(401, 403, 404))
def delete_correction(request: Request, job_id: str, caller: CallerDep) -> Response:
    """Withdraw the job's correction; 404 if it has none."""
    if not corrections.withdraw(request.app.state.client.sessions, caller, _valid_id(job_id)):
        raise _not_found(job_id)
    return Response(status_code=204)
