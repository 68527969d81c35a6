"""``GET /v1/models``: the model versions, and which one each modality serves.

Read-only for every key: promote, rollback and rm stay with the operators
(`mmq models`), who reach SQL directly. No torch here; the API never loads a model.
The answer is also OpenAI's model list (``object: "list"``, ``data``: what ``model``
may name on /v1/embeddings and /v1/audio/transcriptions), so the OpenAI client's
``models.list()`` reads it; ``serving`` and ``versions`` are mmq's own.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from core.jobs import MODALITIES, Modality
from core.store import versions
from producer.api.schemas import error_responses
from producer.web.auth import CallerDep
from producer.web.errors import ApiError


class ModelVersionOut(BaseModel):
    name: str
    modality: Modality
    status: str = Field(description="candidate, promoted or retired")
    base_model: str = Field(description="the pretrained tower it was trained on")
    data_digest: str
    adapter_sha256: str
    accuracy: float | None = Field(None, description="held-out accuracy at training")
    corrections: int | None = Field(None, description="trained from this many corrected "
                                    "jobs (mmq train --from-corrections); null: from files")
    base_accuracy: float | None = Field(None, description="the pretrained tower ('base') on "
                                        "the same held-out items")
    metrics: dict | None = None
    created_at: datetime
    promoted_at: datetime | None = None


class ModelCard(BaseModel):
    """One entry of OpenAI's model list: a name ``model`` may take."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds (0: built in)")
    owned_by: str = "mmq"
    modality: Modality | None = Field(None, description="a version's modality; none: any")


class ModelOut(ModelVersionOut):
    """``GET /v1/models/{name}`` of a version: its entry of OpenAI's list (what the
    client's ``models.retrieve`` reads) with mmq's fields beside it."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds")
    owned_by: str = "mmq"


class ModelsOut(BaseModel):
    object: Literal["list"] = "list"
    # OpenAI's list: "default" (what each modality serves), "base" (the pretrained
    # towers), then the versions; the same names as ``versions``, for OpenAI's client.
    data: list[ModelCard]
    # What a job that names no version runs, per modality: a version, or "base".
    serving: dict[str, str]
    versions: list[ModelVersionOut]


# The names that are no version: "default" (what each modality serves) and "base" (the
# pretrained towers); listed first, and answered by GET /v1/models/{name} as listed.
BUILT_IN = {n: ModelCard(id=n, created=0) for n in ("default", versions.BASE_VERSION)}


router = APIRouter()  # each route names its tag


@router.get("/v1/models", response_model=ModelsOut, tags=["models"],
            responses=error_responses(401, 404))
def list_models(request: Request, caller: CallerDep,
                modality: Modality | None = None) -> ModelsOut:
    """Every model version (newest first per modality) with its held-out metrics,
    and the version each modality serves by default."""
    client = request.app.state.client
    with client.sessions() as s:
        rows = [v.as_dict() for v in versions.list_versions(
            session=s, modality=modality and modality.value)]
        serving = {m: versions.promoted_version(session=s, modality=m)
                   for m in ([modality.value] if modality else MODALITIES)}
    out = [ModelVersionOut(**{k: v for k, v in r.items() if k in ModelVersionOut.model_fields})
           for r in rows]
    cards = [*BUILT_IN.values(), *(_card(v) for v in out)]
    return ModelsOut(data=cards, serving=serving, versions=out)


def _card(v: ModelVersionOut) -> ModelCard:
    return ModelCard(id=v.name, created=int(_utc(v.created_at).timestamp()),
                     modality=v.modality)


def _utc(d: datetime) -> datetime:
    return d if d.tzinfo else d.replace(tzinfo=UTC)  # SQLite hands back naive UTC


@router.get("/v1/models/{name}", response_model=ModelOut | ModelCard, tags=["models"],
            responses=error_responses(401, 404))
def get_model(request: Request, name: str, caller: CallerDep) -> ModelOut | ModelCard:
    """One name of the list: a version (its entry of OpenAI's list and mmq's fields),
    or "default" / "base" as the list shows them, so that OpenAI's
    ``models.retrieve`` answers every name ``models.list`` gives."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    with request.app.state.client.sessions() as s:
        v = versions.get_version(session=s, name=name)
        if v is None:
            raise ApiError(404, "not_found", f"no model version {name!r}")
        d = v.as_dict()
    out = ModelVersionOut(**{k: x for k, x in d.items() if k in ModelVersionOut.model_fields})
    return ModelOut(**out.model_dump(), **_card(out).model_dump(exclude={"modality"}))
