"""Correcting a job's label, shared by ``PUT /v1/jobs/{id}/correction`` and the results
page: who may, and the one error shape when they may not.

Only the key that made a job corrects it: its label is that key's data, and training
from corrections learns from it. Another key's job is not found (as everywhere in the
API); an admin key sees every job but corrects only its own and those made without a
key (by the SDK or CLI), which have no other owner to speak for them.
"""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from core import store
from core.config import Settings
from core.params import check_labels
from core.store import corrections
from core.store.corrections import CorrectionRefused
from producer.web.auth import Caller
from producer.web.errors import ApiError


def may_correct(caller: Caller, job_owner: str | None) -> bool:
    return job_owner == caller.key_id or (caller.admin and job_owner is None)


def _job(s: Session, caller: Caller, job_id: str):
    job = store.get_job(session=s, job_id=job_id, owner=caller.scope)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id}")
    if not may_correct(caller, job.owner):
        raise ApiError(403, "forbidden", f"job {job_id} was made by another key; only the "
                       "key that made a job may correct it")
    return job


def correct(sessions: sessionmaker[Session], settings: Settings, caller: Caller,
            job_id: str, label: object, via: str) -> dict:
    """Record ``label`` as the job's right label -> the correction as a dict.
    ``InvalidInput`` for a bad label, ``ApiError`` 403/404/409 otherwise."""
    (label,) = check_labels([label], max_labels=1, max_chars=settings.max_label_chars)
    with sessions.begin() as s:
        _job(s, caller, job_id)
        try:
            return corrections.set_correction(session=s, job_id=job_id, label=label,
                                              by=caller.key_id, via=via).as_dict()
        except CorrectionRefused as e:
            status = 404 if e.kind == CorrectionRefused.NOT_FOUND else 409
            raise ApiError(status, e.kind, str(e)) from None


def withdraw(sessions: sessionmaker[Session], caller: Caller, job_id: str) -> bool:
    """Delete the job's correction (under the same rule) -> whether it had one."""
    with sessions.begin() as s:
        _job(s, caller, job_id)
        return corrections.delete_correction(session=s, job_id=job_id)


def correction_of(sessions: sessionmaker[Session], caller: Caller, job_id: str) -> dict | None:
    """The job's correction, if this caller sees the job (404 otherwise)."""
    with sessions() as s:
        if store.get_job(session=s, job_id=job_id, owner=caller.scope) is None:
            raise ApiError(404, "not_found", f"no job {job_id}")
        c = corrections.get_correction(session=s, job_id=job_id)
        return None if c is None else c.as_dict()
