"""Payload bytes, content addressed (the claim check: only job ids travel through
Redis)."""

from __future__ import annotations

import hashlib

from sqlalchemy.orm import Session

from core.store.tables import Blob


def put_blob(*, session: Session, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    if session.get(Blob, digest) is None:
        session.add(Blob(sha256=digest, data=data, size=len(data)))
        session.flush()
    return digest


def get_blob(*, session: Session, sha256: str) -> bytes:
    blob = session.get(Blob, sha256)
    if blob is None:
        raise KeyError(f"payload {sha256} is missing from the store")
    return blob.data
