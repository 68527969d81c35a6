"""Payload bytes, content addressed (the claim check: only job ids travel through
Redis)."""

from __future__ import annotations

import hashlib

from sqlalchemy.orm import Session

from core.store.db import _insert_for
from core.store.tables import Blob


def put_blob(*, session: Session, data: bytes) -> str:
    """Store the bytes once under their sha256. Two submits of the same file at once
    both find no row; the second insert then does nothing (it was an IntegrityError,
    a 500, when the same audio was posted concurrently)."""
    digest = hashlib.sha256(data).hexdigest()
    if session.get(Blob, digest) is None:  # the usual case: no bytes re-sent to the server
        insert = _insert_for(session)
        session.execute(insert(Blob).values(sha256=digest, data=data, size=len(data))
                        .on_conflict_do_nothing(index_elements=["sha256"]))
    return digest


def get_blob(*, session: Session, sha256: str) -> bytes:
    blob = session.get(Blob, sha256)
    if blob is None:
        raise KeyError(f"payload {sha256} is missing from the store")
    return blob.data
