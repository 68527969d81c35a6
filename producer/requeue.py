"""Re-send queued jobs whose message was lost (for example, Redis restarted empty).

The job row is the source of truth: a job that is ``queued`` in SQL, was sent
longer ago than the stale limit, and has no message in Redis, is sent again.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import redis

from core import store
from core.config import QUEUES, Settings
from producer.sender import live_job_ids, producer_app, send_jobs

log = logging.getLogger(__name__)


def requeue_stale(settings: Settings, *, modalities=QUEUES, stale_s: float | None = None,
                  single_flight: bool = False) -> int:
    stale = timedelta(seconds=settings.requeue_stale_s if stale_s is None else stale_s)
    if single_flight:
        # Many workers sweep; one at a time per modality set, or they would all re-send.
        r = redis.Redis.from_url(settings.broker_url)
        key = "mmq:requeue-lock:" + ",".join(sorted(modalities))
        me = f"{socket.gethostname()}:{os.getpid()}"
        if not r.set(key, me, nx=True, ex=max(10, int(settings.requeue_every_s))):
            return 0
    engine = store.make_engine(settings.db_url)
    try:
        sessions = store.session_factory(engine)
        with sessions() as s:
            candidates = [(j.id, j.modality) for j in
                          store.stale_queued(session=s, older_than=stale)
                          if j.modality in modalities]
        if not candidates:
            return 0
        live = live_job_ids(settings, modalities)
        lost = [(i, m) for i, m in candidates if i not in live]
        if not lost:
            return 0
        sent = send_jobs(producer_app(settings), lost)
        with sessions.begin() as s:
            store.mark_sent(session=s, job_ids=sent)
        log.info("requeued %d job(s)", len(sent))
        return len(sent)
    finally:
        engine.dispose()
