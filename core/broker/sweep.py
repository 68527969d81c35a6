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
- a message fetched but not acknowledged whose job is still ``queued``: its worker
  died before starting it. Each worker records its name beside every message it
  fetches (``FETCHED_BY``, workers/poison.py), so such a message goes back as soon
  as the store says that worker's lease is dead, whatever the age of the worker.
  A message with no recorded fetcher (a worker without that record) goes back once
  it has been unacknowledged for ``requeue_stale_s`` (and ``lease_s``), measured on
  the Redis server's clock from the first sweep that saw it: never on kombu's fetch
  time, which is the fetching host's wall clock.

No decision here compares two hosts' wall clocks: leases are judged by the store,
ages by Redis's ``TIME``.

Re-sending may run a job twice (a message in flight between kombu's BRPOP and its
unacked record looks lost for a moment); writes are idempotent by job id, so the
outcome is one prediction, as with any at-least-once redelivery.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis

from core import store
from core.broker.queues import (
    BROKER_CHANGED,
    BROKER_RUN_ID,
    FETCHED_BY,
    FILLER,
    SWEEP_LOCK,
    UNACKED,
    UNACKED_INDEX,
    UNACKED_SEEN,
    all_queue_keys,
    queued_job_ids,
    unacked_job_ids,
)
from core.broker.redis_client import redis_for
from core.broker.sender import producer_app, send_jobs
from core.broker.transport import extra_jobs
from core.config import Settings
from core.jobs import QUEUES

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
    unacked: dict[str, tuple[bytes, str | None]]  # job id -> (delivery tag, fetched by)
    tags: set[bytes] = field(default_factory=set)  # every tag in the unacked hash
    stray_owners: list[bytes] = field(default_factory=list)  # FETCHED_BY without unacked
    # Tags this sweep put back: a run_jobs message carries several jobs, and is put
    # back once for all of them.
    restored: set[bytes] = field(default_factory=set)

    def restore(self, r: redis.Redis, tag: bytes) -> bool:
        """Put the message back (once per sweep); -> whether it is back."""
        if tag not in self.restored and restore_unacked(r, tag):
            self.restored.add(tag)
        return tag in self.restored


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
            # Messages sent before a new primary took over may be missing: look for
            # those jobs now, not a minute later (later ones take the usual path).
            if changed_at := _new_primary(r, settings, s):
                recent = store.stale_queued(
                    session=s, older_than=timedelta(seconds=NEW_PRIMARY_STALE_S),
                    sent_before=changed_at)
            stale_jobs = [(j.id, j.modality) for j in
                          (store.stale_queued(session=s, older_than=stale) if queued else [])
                          + (recent if changed_at else []) if j.modality in modalities]
            stale_jobs = list(dict.fromkeys(stale_jobs))
            orphans = [(j.id, j.modality, j.worker) for j in
                       store.orphaned_running(session=s, lease=lease)
                       if j.modality in modalities]
        msgs = _messages(r, modalities, read_queues=bool(stale_jobs or orphans))
        # Read after the messages: a worker's lease row exists before it fetches
        # anything (workers/__main__.py), so every fetcher named in ``msgs`` that is
        # alive is in this list.
        with sessions() as s:
            live = set(store.live_workers(session=s, lease=lease))
        out = SweepResult()
        # A message with no known fetcher must be older than a lease (and than the
        # stale limit: `mmq requeue --stale 0` must not take messages from live workers).
        out.restored += _restore_fetched_unstarted(r, msgs, live, max(stale, lease), sessions)
        lost = [(i, m) for i, m in stale_jobs if i not in msgs.queued and i not in msgs.unacked]
        moved_orphans = _recover_orphans(r, msgs, orphans, sessions, out)
        lost += moved_orphans
        if lost:
            out.resent += send_jobs(producer_app(settings), lost, settings.jobs_per_message)
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


# A queued job sent longer ago than this, with no message on a new primary, is re-sent.
# Not 0: a submit's send takes milliseconds, and a job sent that recently is on its way.
NEW_PRIMARY_STALE_S = 3.0


def _new_primary(r: redis.Redis, settings: Settings, session) -> datetime | None:
    """Whether the Redis primary is new since the last sweep, or was within the stale
    limit: it restarted (perhaps empty) or a replica was promoted by Sentinel, and
    replication is asynchronous, so messages pushed to the old one just before may be
    gone. Its ``run_id`` changes in every case (and the key holding the last one
    either moved with the data, or is gone). For ``requeue_stale_s`` after that, the
    sweep re-sends queued jobs with no message as soon as they are a few seconds old,
    instead of after ``requeue_stale_s``: a failover or an empty restart is then
    recovered in one sweep turn, not a minute. Only jobs sent before the change was
    seen (the database's time then, returned) whose send had succeeded: a job sent
    since went to the new primary, and one whose send failed or is still being tried
    (no ``sent_at``; its producer may be retrying) keeps the usual minute."""
    # One run id and one flag for every sweep on this Redis, whatever its modalities
    # (they only choose the jobs it re-sends, in ``sweep``). Keyed per modality set,
    # the first sweep of a new set (`mmq requeue`: all three, beside workers sweeping
    # one each) took a stable primary for a new one. Now the first sweep of any set
    # compares with what any sweep saw, and a change one set sees is flagged for all
    # (the image workers' sweep, coming after the text workers', finds the run id
    # already updated, and reads the flag). A sweep racing the one that saw the change
    # may miss the flag for one turn (5 s); it lasts ``requeue_stale_s``.
    run_id = str(r.info("server").get("run_id", ""))
    last = r.set(BROKER_RUN_ID, run_id, get=True)
    if last is None or last.decode() != run_id:
        seen = store.db_time(session=session)
        r.set(BROKER_CHANGED, seen.isoformat(), ex=max(1, int(settings.requeue_stale_s)))
        log.warning("sweep: the Redis primary is new (restarted or failed over); re-sending "
                    "queued jobs sent before it whose message it lacks")
        return seen
    flag = r.get(BROKER_CHANGED)
    return None if flag is None else datetime.fromisoformat(flag.decode())


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
    between the two reads is then seen in at least one of them. The unacked hash and
    the fetchers are read in one transaction: both change in one (workers/poison.py)."""
    queued: set[str] = set()
    with r.pipeline(transaction=False) as pipe:
        for key in all_queue_keys(modalities) if read_queues else []:
            pipe.lrange(key, 0, -1)
        for raws in pipe.execute():
            queued.update(*(queued_job_ids(raw) for raw in raws))
    with r.pipeline(transaction=True) as pipe:
        entries, owners = pipe.hgetall(UNACKED).hgetall(FETCHED_BY).execute()
    unacked: dict[str, tuple[bytes, str | None]] = {}
    for tag, raw in entries.items():
        owner = owners.get(tag)
        for job_id in unacked_job_ids(raw):
            unacked[job_id] = (tag, owner.decode(errors="replace") if owner else None)
    return _Messages(queued, unacked, set(entries), [t for t in owners if t not in entries])


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
        if job_id in msgs.unacked and msgs.restore(r, msgs.unacked[job_id][0]):
            out.restored.append(job_id)
        else:
            need_send.append((job_id, modality))
    return need_send


def _restore_fetched_unstarted(r: redis.Redis, msgs: _Messages, live: set[str],
                               stale: timedelta, sessions) -> list[str]:
    """Fetched messages whose job never started, of workers that are gone: a worker
    starts every job it fetches at once (prefetch = its thread count), and its
    running ones are the orphans' business. Gone means: the fetcher is known and
    holds no live lease, or it is unknown and the message has been unacknowledged
    for over ``stale`` on Redis's clock."""
    dead = {j: tag for j, (tag, owner) in msgs.unacked.items()
            if owner is not None and owner not in live}
    unowned = {j: tag for j, (tag, owner) in msgs.unacked.items() if owner is None}
    old_tags = _unacked_longer_than(r, msgs, set(unowned.values()), stale.total_seconds())
    candidates = dead | {j: tag for j, tag in unowned.items() if tag in old_tags}
    if not candidates:
        return []
    with sessions() as s:
        still_queued = set(store.queued_among(session=s, job_ids=list(candidates)))
    return [j for j in still_queued if msgs.restore(r, candidates[j])]


# Deletes the fetchers recorded for tags no longer in the unacked hash (kombu's own QoS,
# in a worker without ours, removed them), checked inside Redis: a tag can come back.
_FORGET_STRAY = """
for _, tag in ipairs(ARGV) do
  if redis.call('HEXISTS', KEYS[1], tag) == 0 then redis.call('HDEL', KEYS[2], tag) end
end
"""


def _unacked_longer_than(r: redis.Redis, msgs: _Messages, tags: set[bytes],
                         limit_s: float) -> set[bytes]:
    """Those of ``tags`` first seen by a sweep over ``limit_s`` ago, on the Redis
    server's clock (one clock for every sweeper, whatever their hosts' clocks say).
    A sweep sees a message at most one sweep period after its fetch: its age is
    under-estimated by that much, so it is never restored early. Also keeps the
    first-seen hash to the messages still unacknowledged."""
    secs, usecs = r.time()
    now = secs + usecs / 1e6
    seen = {t: float(v) for t, v in r.hgetall(UNACKED_SEEN).items()}
    with r.pipeline(transaction=False) as pipe:
        new = tags - set(seen)
        for tag in new:
            pipe.hsetnx(UNACKED_SEEN, tag, repr(now))
        gone = [t for t in seen if t not in msgs.tags]
        if gone:
            pipe.hdel(UNACKED_SEEN, *gone)
        if msgs.stray_owners:
            pipe.eval(_FORGET_STRAY, 2, UNACKED, FETCHED_BY, *msgs.stray_owners)
        pipe.execute()
    return {t for t in tags if t in seen and now - seen[t] > limit_s}


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
        pipe.hdel(FETCHED_BY, tag)
        pipe.hdel(UNACKED_SEEN, tag)
        if extra := extra_jobs(payload):  # its fillers, behind it (core/broker/transport.py)
            pipe.rpush(queue, *[FILLER] * extra)
        pipe.rpush(queue, json.dumps(payload))  # BRPOP takes from the right: next up
        return True

    return r.transaction(restore, UNACKED, value_from_callable=True)
