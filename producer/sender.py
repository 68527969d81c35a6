"""Sending jobs to the workers by task name, without importing the workers.

A job's Celery task id is its job id, so a message in Redis can be matched to
its job (``requeue`` relies on it) and Flower shows the job id directly.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from celery import Celery
from kombu import Exchange, Queue

from core.config import QUEUES, Settings
from core.jobs import RUN_JOB_TASK


def producer_app(settings: Settings) -> Celery:
    app = Celery("mmq-producer", broker=settings.broker_url)
    app.conf.update(
        task_serializer="json", accept_content=["json"],
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry=False, broker_connection_max_retries=0,
        # No "task-sent" events: each would be a second publish per job, halving the
        # submit rate; Flower follows jobs from the workers' received/started events.
        task_send_sent_event=False,
        # Published through the default exchange ("") with the queue's name as the
        # routing key: the message goes straight onto that queue's list, with no
        # binding-table lookup in Redis per message and no way onto another queue.
        task_queues=[Queue(q, Exchange(""), routing_key=q) for q in QUEUES],
    )
    return app


def send_jobs(app: Celery, jobs: Iterable[tuple[str, str]]) -> list[str]:
    """Publish (job_id, modality) pairs over one connection; returns the ids sent."""
    sent = []
    with app.producer_or_acquire() as producer, producer.batch(max_size=1000):
        # kombu buffers the LPUSHes of a batch in one Redis pipeline: one round
        # trip per thousand jobs instead of one (and a new client object) per job.
        for job_id, modality in jobs:
            app.send_task(RUN_JOB_TASK, args=[job_id], kwargs={"modality": modality},
                          queue=modality, task_id=job_id, producer=producer, retry=False)
            sent.append(job_id)
    return sent


def _queue_keys(q: str) -> list[str]:
    # kombu keeps one list per priority step: "q", "q\x06\x163", "q\x06\x166", ...
    return [q] + [f"{q}\x06\x16{p}" for p in (3, 6, 9)]


def queue_depths(settings: Settings, modalities: Iterable[str] = QUEUES,
                 client: redis.Redis | None = None) -> dict[str, int]:
    """Messages waiting in each modality's queue (not counting fetched, unacked ones)."""
    r = client or redis.Redis.from_url(settings.broker_url, socket_timeout=2)
    with r.pipeline(transaction=False) as pipe:
        mods = list(modalities)
        for q in mods:
            for key in _queue_keys(q):
                pipe.llen(key)
        counts = pipe.execute()
    n = len(_queue_keys(""))
    return {q: sum(counts[i * n:(i + 1) * n]) for i, q in enumerate(mods)}


# -- admission: check the queue limit and reserve room in one step ---------------------------

# Room held by a submit that has passed the check and not yet pushed its messages.
# Per queue: a hash {token: jobs} and a sorted set {token: expiry, ms}. The expiry is
# a safety net for an API process that dies between reserving and releasing; it
# must outlast the slowest submit (writing 1000 jobs and 64 MiB of payloads).
ADMIT_KEY = "mmq:admit:"
ADMIT_TTL_S = 120

# KEYS: per modality its 4 queue lists, its hash, its expiry set (6 each).
# ARGV: limit, token, ttl_ms, n, then the n wanted counts. Returns {admitted, depths...}.
# Redis runs a script alone, so no other submit sees the queues between the count
# and the reservation: the LLEN-then-push race (200 clients took a limit of 100 to
# 115) cannot happen. Depth = messages waiting + room reserved by submits in flight.
_ADMIT_LUA = """
local limit, token, ttl, n = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local depths, full = {}, false
for i = 1, n do
  local b = (i - 1) * 6
  for _, stale in ipairs(redis.call('ZRANGEBYSCORE', KEYS[b + 6], '-inf', now)) do
    redis.call('HDEL', KEYS[b + 5], stale)
    redis.call('ZREM', KEYS[b + 6], stale)
  end
  local depth = 0
  for k = 1, 4 do depth = depth + redis.call('LLEN', KEYS[b + k]) end
  for _, v in ipairs(redis.call('HVALS', KEYS[b + 5])) do depth = depth + tonumber(v) end
  depths[i] = depth
  if depth + tonumber(ARGV[4 + i]) > limit then full = true end
end
if not full then
  for i = 1, n do
    local b = (i - 1) * 6
    redis.call('HSET', KEYS[b + 5], token, ARGV[4 + i])
    redis.call('ZADD', KEYS[b + 6], now + ttl, token)
  end
end
local out = {full and 0 or 1}
for i = 1, n do out[i + 1] = depths[i] end
return out
"""


@dataclass(frozen=True)
class Admission:
    """The outcome of ``reserve_room``: room held under ``token`` until released."""

    admitted: bool
    depths: dict[str, int]  # per modality: waiting + reserved, before this request
    token: str = ""


def reserve_room(r: redis.Redis, wanted: dict[str, int], limit: int) -> Admission:
    """Atomically: if every modality's queue has room for its ``wanted`` jobs under
    ``limit``, reserve that room. Release it with ``release_room`` once the messages
    are pushed (they then count in the queue's length) or the submit failed."""
    mods = [m for m, n in wanted.items() if n > 0]
    token = uuid.uuid4().hex
    keys = [k for m in mods for k in (*_queue_keys(m), ADMIT_KEY + m, ADMIT_KEY + m + ":exp")]
    out = r.register_script(_ADMIT_LUA)(
        keys=keys, args=[limit, token, ADMIT_TTL_S * 1000, len(mods), *(wanted[m] for m in mods)])
    depths = {m: int(d) for m, d in zip(mods, out[1:], strict=True)}
    return Admission(bool(out[0]), depths, token if out[0] else "")


def release_room(r: redis.Redis, admission: Admission) -> None:
    if not admission.token:
        return
    with r.pipeline(transaction=True) as pipe:
        for m in admission.depths:
            pipe.hdel(ADMIT_KEY + m, admission.token)
            pipe.zrem(ADMIT_KEY + m + ":exp", admission.token)
        pipe.execute()


def live_job_ids(settings: Settings, modalities: Iterable[str] = QUEUES) -> set[str]:
    """Job ids that have a message in Redis: waiting in a queue, or fetched by a
    worker and not yet acknowledged (kombu's ``unacked`` hash)."""
    r = redis.Redis.from_url(settings.broker_url)
    ids: set[str] = set()
    for key in [k for q in modalities for k in _queue_keys(q)]:
        for raw in r.lrange(key, 0, -1):
            ids.add(_task_id(raw))
    for raw in r.hvals("unacked"):
        try:
            ids.add(_task_id(json.dumps(json.loads(raw)[0])))
        except (ValueError, IndexError, TypeError):
            continue
    ids.discard("")
    return ids


def _task_id(raw: bytes | str) -> str:
    try:
        return json.loads(raw).get("headers", {}).get("id", "")
    except (ValueError, AttributeError):
        return ""
