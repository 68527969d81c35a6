"""Stored predictions for the search tests: unit vectors written as a worker writes
them, and the brute-force oracle."""

from __future__ import annotations

import numpy as np
from sqlalchemy import update

from core import store
from core.jobs import JobResult

D = 384
V1, V2 = "model@v1", "model@v2"


def unit(rng, n: int) -> np.ndarray:
    x = rng.standard_normal((n, D)).astype(np.float32)  # (n, D)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def store_jobs(sessions, vecs, *, modality="text", task="embed", owner=None, labels=None,
               version=V1, params=None, texts=None, created_at=None) -> list[str]:
    """Succeeded jobs with these embeddings, written as a worker writes them."""
    ids = []
    with sessions.begin() as s:
        for i in range(len(vecs)):
            job = store.create_job(session=s, modality=modality, task=task,
                                   params=dict(params or {}), owner=owner,
                                   text=(texts[i] if texts else f"text {i}")
                                   if modality == "text" else None,
                                   payload=None if modality == "text" else b"x%d" % i)
            ids.append(job.id)
        s.flush()
        if created_at is not None:
            s.execute(update(store.Job).where(store.Job.id.in_(ids))
                      .values(created_at=created_at))
        store.start_jobs(session=s, job_ids=ids, worker="w")
        store.finish_jobs(session=s, model_version=version, attempts=dict.fromkeys(ids, 1),
                          results={
            j: JobResult(embedding=v, labels=None if labels is None else labels[i])
            for i, (j, v) in enumerate(zip(ids, vecs, strict=True))})
    return ids


def brute(vecs, ids, q, k):
    order = np.argsort(-(vecs @ q), kind="stable")[:k]
    return [ids[i] for i in order]
