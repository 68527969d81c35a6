"""The sweep: no job is left without a message or a live worker.

The job row is the source of truth. Every unfinished job is either ``queued`` with
a live message (waiting in a queue, or fetched and not yet acknowledged), or
``running`` under a worker whose lease is live. The sweep (``mmq requeue``, and
every worker every ``MMQ_REQUEUE_EVERY_S``, one at a time) repairs the rest:

- a ``queued`` job sent longer than ``requeue_stale_s`` ago with no message (the
  broker restarted empty, or the send failed) is sent again;
- a ``running`` job whose worker's lease expired (SIGKILL, OOM, a lost host): its
  unacknowledged message, if kombu still holds one, goes straight back onto the
  queue, without waiting for the visibility timeout (an hour by default, and kombu
  only scans for expired ones every ~100 s); with no message it is sent again.
  The job goes back to ``queued`` either way;
- a message fetched but not acknowledged for longer than ``requeue_stale_s`` (and
  ``lease_s``) whose job is still ``queued``: its worker died before starting it.

Re-sending may run a job twice (a message in flight between kombu's BRPOP and its
unacked record looks lost for a moment); writes are idempotent by job id, so the
outcome is one prediction, as with any at-least-once redelivery.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import redis
from sqlalchemy import select

from core import store
from core.broker.queues import (
    SWEEP_LOCK,
    UNACKED,
    UNACKED_INDEX,
    all_queue_keys,
    task_id,
    unacked_task_id,
)
from core.broker.redis_client import redis_for
from core.broker.sender import producer_app, send_jobs
from core.config import Settings
from core.jobs import QUEUES, JobStatus

log = logging.getLogger(__name__)



@dataclass
class SweepResult:
    resent: list[str] = field(default_factory=list)  # new messages sent
    restored: list[str] = field(default_factory=list)  # unacked messages put back

    @property
    def total(self) -> int:
        return len(self.resent) + len(self.restored)


@dataclass
class _Messages:
    queued: set[str]  # job ids with a message waiting in a queue
    unacked: dict[str, tuple[bytes, float]]  # job id -> (delivery tag, fetched at)


def requeue_stale(settings: Settings, *, modalities=QUEUES, stale_s: float | None = None,
                  single_flight: bool = False) -> int:
    """One sweep; -> how many jobs got their message back."""
    return sweep(settings, modalities=modalities, stale_s=stale_s,
                 single_flight=single_flight).total


def sweep(settings: Settings, *, modalities=QUEUES, stale_s: float | None = None,
          single_flight: bool = False, queued: bool = True) -> SweepResult:
    """``queued=False`` skips the stale queued jobs: finding whether they have a
    message means reading every message in the queues, which under a backlog of
    100k is a second of CPU; the workers do that part every few turns only."""
    stale = timedelta(seconds=settings.requeue_stale_s if stale_s is None else stale_s)
    lease = timedelta(seconds=settings.lease_s)
    r = redis_for(settings, socket_timeout=10)
    if single_flight and not _take_turn(r, settings, modalities):
        r.close()
        return SweepResult()
    engine = store.make_engine(settings.db_url)
    try:
        sessions = store.session_factory(engine)
        with sessions() as s:
            stale_jobs = [(j.id, j.modality) for j in
                          (store.stale_queued(session=s, older_than=stale) if queued else [])
                          if j.modality in modalities]
            orphans = [(j.id, j.modality, j.worker) for j in
                       store.orphaned_running(session=s, lease=lease)
                       if j.modality in modalities]
        msgs = _messages(r, modalities, read_queues=bool(stale_jobs or orphans))
        out = SweepResult()
        # A worker starts what it fetches at once; a message fetched over a lease ago
        # (and over the stale limit: `mmq requeue --stale 0` must not take messages
        # from live workers) whose job never started belongs to a dead one.
        out.restored += _restore_fetched_unstarted(r, msgs, max(stale, lease), sessions)
        lost = [(i, m) for i, m in stale_jobs if i not in msgs.queued and i not in msgs.unacked]
        moved_orphans = _recover_orphans(r, msgs, orphans, sessions, out)
        lost += moved_orphans
        if lost:
            out.resent += send_jobs(producer_app(settings), lost)
            with sessions.begin() as s:
                store.mark_sent(session=s, job_ids=out.resent)
        with sessions.begin() as s:  # one row per worker start: keep a day of them
            store.forget_dead_leases(session=s, older_than=timedelta(days=1))
        if out.total:
            log.warning("sweep: re-sent %d job(s) whose message was lost, put back %d "
                        "unacknowledged message(s) of dead workers",
                        len(out.resent), len(out.restored))
        return out
    finally:
        engine.dispose()
        r.close()


def live_job_ids(settings: Settings, modalities=QUEUES) -> set[str]:
    """Job ids with a message in Redis: waiting in a queue, or fetched and not yet
    acknowledged (kombu's ``unacked`` hash)."""
    r = redis_for(settings, socket_timeout=10)
    try:
        msgs = _messages(r, modalities)
    finally:
        r.close()
    return msgs.queued | set(msgs.unacked)


def _take_turn(r: redis.Redis, settings: Settings, modalities) -> bool:
    """Many workers sweep; one at a time per modality set, or they would all re-send."""
    key = SWEEP_LOCK + ",".join(sorted(modalities))
    me = f"{socket.gethostname()}:{os.getpid()}"
    return bool(r.set(key, me, nx=True, ex=max(2, int(settings.requeue_every_s))))


def _messages(r: redis.Redis, modalities, read_queues: bool = True) -> _Messages:
    """Queues first, then the unacked hash: a message moving from one to the other
    between the two reads is then seen in at least one of them."""
    queued: set[str] = set()
    with r.pipeline(transaction=False) as pipe:
        for key in all_queue_keys(modalities) if read_queues else []:
            pipe.lrange(key, 0, -1)
        for raws in pipe.execute():
            queued |= {task_id(raw) for raw in raws}
    fetched_at = dict(r.zrange(UNACKED_INDEX, 0, -1, withscores=True))
    unacked: dict[str, tuple[bytes, float]] = {}
    for tag, raw in r.hgetall(UNACKED).items():
        if job_id := unacked_task_id(raw):
            unacked[job_id] = (tag, fetched_at.get(tag, time.time()))
    queued.discard("")
    return _Messages(queued, unacked)


def _recover_orphans(r: redis.Redis, msgs: _Messages, orphans: list[tuple[str, str, str]],
                     sessions, out: SweepResult) -> list[tuple[str, str]]:
    """Running jobs of dead workers back to queued; -> those that need a new message."""
    if not orphans:
        return []
    with sessions.begin() as s:
        moved = set(store.requeue_orphans(session=s, jobs=[(i, w) for i, _, w in orphans]))
    need_send = []
    for job_id, modality, _ in orphans:
        if job_id not in moved or job_id in msgs.queued:
            continue
        if job_id in msgs.unacked and restore_unacked(r, msgs.unacked[job_id][0]):
            out.restored.append(job_id)
        else:
            need_send.append((job_id, modality))
    return need_send


def _restore_fetched_unstarted(r: redis.Redis, msgs: _Messages, stale: timedelta,
                               sessions) -> list[str]:
    """Messages fetched longer than ``stale`` ago whose job never started: a worker
    starts every job it fetches at once (prefetch = its thread count), so the one
    that fetched these is gone."""
    cutoff = time.time() - stale.total_seconds()
    old = {j: tag for j, (tag, at) in msgs.unacked.items() if at < cutoff}
    if not old:
        return []
    with sessions() as s:
        still_queued = set(s.scalars(
            select(store.Job.id).where(store.Job.id.in_(list(old)),
                                       store.Job.status == JobStatus.QUEUED.value)))
    return [j for j in still_queued if restore_unacked(r, old[j])]


def restore_unacked(r: redis.Redis, tag: bytes) -> bool:
    """Put one unacknowledged message back at the consuming end of its queue, as
    kombu's own restore does, in one transaction: if its worker (or another sweep)
    acknowledged or restored it meanwhile, nothing happens. -> True if restored."""
    def restore(pipe) -> bool:
        raw = pipe.hget(UNACKED, tag)
        if raw is None:
            pipe.multi()
            return False
        payload, exchange, routing_key = json.loads(raw)
        payload.setdefault("headers", {})["redelivered"] = True
        queue = routing_key or exchange  # our queues: routing key == queue name
        pipe.multi()
        pipe.zrem(UNACKED_INDEX, tag)
        pipe.hdel(UNACKED, tag)
        pipe.rpush(queue, json.dumps(payload))  # BRPOP takes from the right: next up
        return True

    return r.transaction(restore, UNACKED, value_from_callable=True)
