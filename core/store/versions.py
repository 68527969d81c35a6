"""Store functions for model versions: record, list, promote, roll back, remove.

A version is immutable once recorded (name -> adapter file + sha256); only its
status changes. Which version serves a modality by default is the one row with
status ``promoted`` (a partial unique index keeps it one); workers read it in the
same UPDATE that starts a job (``core.store.start_jobs``), so a promote reaches
every worker at the next job, with no restart and no cache to expire.
"""

from __future__ import annotations

import re

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core.errors import InvalidInput
from core.store.tables import ACTIVE, BASE_VERSION, Job, ModelVersion, VersionStatus, utcnow

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class VersionError(ValueError):
    """A version operation that cannot be done (unknown name, wrong state)."""


def check_version_name(name: object) -> str:
    """A new version's name: letters, digits, ``.``, ``_``, ``-``; not ``base``."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInput(f"version name {name!r}: use 1-100 letters, digits, '.', '_' or "
                           "'-', starting with a letter or digit")
    if name == BASE_VERSION:
        raise InvalidInput(f"{BASE_VERSION!r} is reserved: it names the pretrained tower")
    return name


def could_be_version(name: object) -> bool:
    """Whether a recorded version could have this name: every one passed
    ``check_version_name``. A lookup of any other name is a miss without a query, so
    that no caller sends the database what it cannot compare: PostgreSQL refuses a NUL
    in text (DataError, a 500 at the API), either database a lone surrogate."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def create_version(*, session: Session, name: str, modality: str, base_model: str,
                   data_digest: str, metrics: dict, config: dict, adapter_file: str,
                   adapter_sha256: str) -> ModelVersion:
    check_version_name(name)
    v = ModelVersion(name=name, modality=modality, base_model=base_model,
                     data_digest=data_digest, metrics=metrics, config=config,
                     adapter_file=adapter_file, adapter_sha256=adapter_sha256,
                     status=VersionStatus.CANDIDATE.value, created_at=utcnow())
    session.add(v)
    session.flush()
    return v


def get_version(*, session: Session, name: str) -> ModelVersion | None:
    if not could_be_version(name):
        return None
    return session.get(ModelVersion, name)


def list_versions(*, session: Session, modality: str | None = None) -> list[ModelVersion]:
    q = select(ModelVersion).order_by(ModelVersion.modality, ModelVersion.created_at.desc())
    if modality:
        q = q.where(ModelVersion.modality == modality)
    return list(session.scalars(q))


def promoted_version(*, session: Session, modality: str) -> str:
    """The version jobs of this modality run when they name none (``base``: no adapter)."""
    name = session.scalar(select(ModelVersion.name).where(
        ModelVersion.modality == modality, ModelVersion.status == VersionStatus.PROMOTED.value))
    return name or BASE_VERSION


def promoted_subquery(modality_column):
    """The promoted version's name for a row's modality, as a correlated scalar subquery
    (NULL when none): what ``start_jobs`` resolves a job's version from."""
    return (select(ModelVersion.name)
            .where(ModelVersion.modality == modality_column,
                   ModelVersion.status == VersionStatus.PROMOTED.value)
            .scalar_subquery())


def version_modalities(*, session: Session, names: list[str]) -> dict[str, str]:
    """{name: modality} of the existing versions among ``names``."""
    names = [n for n in dict.fromkeys(names) if n != BASE_VERSION and could_be_version(n)]
    if not names:
        return {}
    return dict(session.execute(select(ModelVersion.name, ModelVersion.modality)
                                .where(ModelVersion.name.in_(names))).all())


def check_job_version(name: object, modality: str, known: dict[str, str]) -> str:
    """A job's ``model_version``: ``base`` or an existing version of its modality
    (``known``: ``version_modalities`` of the request's names); else ``InvalidInput``."""
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"model_version must be a version name, got {name!r}")
    if name == BASE_VERSION:
        return name
    if not could_be_version(name):  # e.g. a NUL or a control character: no version has it
        raise InvalidInput(f"model_version {name[:120]!r} is not a version name (letters, "
                           "digits, '.', '_', '-')")
    if name not in known:
        raise InvalidInput(f"model_version {name!r} does not exist (`mmq models list`, "
                           "GET /v1/models)")
    if known[name] != modality:
        raise InvalidInput(f"model_version {name!r} is for {known[name]} jobs, not {modality}")
    return name


def promote(*, session: Session, name: str) -> ModelVersion:
    """Make ``name`` the default of its modality; the one it replaces is retired."""
    v = (session.get(ModelVersion, name, with_for_update=True) if could_be_version(name)
         else None)
    if v is None:
        raise VersionError(f"no model version {name!r}")
    if v.status == VersionStatus.PROMOTED.value:
        return v
    # Retire first: the partial unique index allows one promoted row per modality.
    session.execute(update(ModelVersion).where(
        ModelVersion.modality == v.modality, ModelVersion.status == VersionStatus.PROMOTED.value)
        .values(status=VersionStatus.RETIRED.value))
    session.flush()
    v.status = VersionStatus.PROMOTED.value
    v.promoted_at = utcnow()
    session.flush()
    return v


def rollback(*, session: Session, modality: str) -> tuple[str, str]:
    """Undo the last promote of a modality: the promoted version is retired (and
    forgets that promotion), the version promoted most recently before it serves
    again, or ``base`` if none. -> (from, to)."""
    current = session.scalar(select(ModelVersion).where(
        ModelVersion.modality == modality, ModelVersion.status == VersionStatus.PROMOTED.value))
    if current is None:
        raise VersionError(f"no promoted {modality} version to roll back ({BASE_VERSION} "
                           "serves already)")
    current.status = VersionStatus.RETIRED.value
    current.promoted_at = None
    session.flush()
    previous = session.scalar(
        select(ModelVersion).where(ModelVersion.modality == modality,
                                   ModelVersion.promoted_at.is_not(None),
                                   ModelVersion.name != current.name)
        .order_by(ModelVersion.promoted_at.desc()).limit(1))
    if previous is None:
        return current.name, BASE_VERSION
    previous.status = VersionStatus.PROMOTED.value
    session.flush()
    return current.name, previous.name


def remove_version(*, session: Session, name: str, force: bool = False) -> ModelVersion:
    """Delete a version's row (the caller deletes its file after the commit). A promoted
    version, or one that queued or running jobs name, is kept unless ``force``."""
    v = get_version(session=session, name=name)
    if v is None:
        raise VersionError(f"no model version {name!r}")
    if v.status == VersionStatus.PROMOTED.value:
        raise VersionError(f"{name!r} is promoted; promote another or roll back first")
    waiting = session.scalar(select(func.count()).select_from(Job).where(
        Job.model_version == name, Job.status.in_(ACTIVE)))
    if waiting and not force:
        raise VersionError(f"{waiting} queued or running job(s) name {name!r}; they would "
                           "fail (--force removes it anyway)")
    session.delete(v)
    session.flush()
    return v


def version_refs(*, session: Session, names: list[str]) -> dict[str, ModelVersion]:
    """The versions a worker is about to run, by name (removed ones are missing)."""
    names = [n for n in dict.fromkeys(names) if n != BASE_VERSION and could_be_version(n)]
    if not names:
        return {}
    return {v.name: v for v in session.scalars(
        select(ModelVersion).where(ModelVersion.name.in_(names)))}


__all__ = ["BASE_VERSION", "VersionError", "VersionStatus", "check_job_version",
           "check_version_name", "could_be_version", "create_version", "get_version",
           "list_versions", "promote", "promoted_subquery", "promoted_version",
           "remove_version", "rollback", "version_modalities", "version_refs"]
