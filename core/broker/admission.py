"""Admission: the queue limit checked and room reserved in one step.

``MMQ_MAX_QUEUE_DEPTH`` bounds each modality's queue. Reading LLEN and then
pushing lets concurrent submits all pass the check (200 clients took a limit of
100 to 115); here the check and the reservation are one Redis script.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import redis

from core.broker.queues import ADMIT, queue_keys

# Room held by a submit that has passed the check and not yet pushed its messages.
# Per queue: a hash {token: jobs} and a sorted set {token: expiry, ms}. The expiry is
# a safety net for an API process that dies between reserving and releasing; it
# must outlast the slowest submit (writing 1000 jobs and 64 MiB of payloads).
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
    keys = [k for m in mods for k in (*queue_keys(m), ADMIT + m, ADMIT + m + ":exp")]
    out = r.register_script(_ADMIT_LUA)(
        keys=keys, args=[limit, token, ADMIT_TTL_S * 1000, len(mods), *(wanted[m] for m in mods)])
    depths = {m: int(d) for m, d in zip(mods, out[1:], strict=True)}
    return Admission(bool(out[0]), depths, token if out[0] else "")


def release_room(r: redis.Redis, admission: Admission) -> None:
    if not admission.token:
        return
    with r.pipeline(transaction=True) as pipe:
        for m in admission.depths:
            pipe.hdel(ADMIT + m, admission.token)
            pipe.zrem(ADMIT + m + ":exp", admission.token)
        pipe.execute()


