"""Queue declarations and the Redis key layout: the one place that knows both.

One Celery queue per modality, named after it (``core.jobs.Modality``). Kombu's
Redis transport keeps a queue as lists (one per priority step), and fetched but
unacknowledged messages in a hash plus a sorted set of fetch times; mmq adds keys
of its own under ``mmq:``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable

from kombu import Exchange, Queue

from core.jobs import QUEUES, RUN_JOBS_TASK

# -- kombu's keys (its Redis transport's ack emulation) ---------------------------------
UNACKED = "unacked"  # hash: delivery tag -> JSON [message, exchange, routing key]
# sorted set: delivery tag -> fetch time (s) on the fetching host's clock: kombu's own
# visibility timeout uses it; mmq decides nothing on it (hosts' clocks differ)
UNACKED_INDEX = "unacked_index"

# -- what mmq puts in a queue's list besides messages -----------------------------------
# One entry per job beyond the first of a run_jobs message, pushed right behind it, so
# that a list's length counts jobs (core/broker/transport.py); workers drop them.
FILLER = b"mmq:+1"
JOBS_HEADER = "mmq_jobs"  # a run_jobs message's header: how many jobs it carries

# -- mmq's keys --------------------------------------------------------------------------
SWEEP_LOCK = "mmq:requeue-lock:"  # + modalities: one sweeping worker at a time
ADMIT = "mmq:admit:"  # + queue: room reserved by submits in flight (hash, + ":exp")
DEAD_LETTERS = "mmq:dead-letters"  # list of JSON entries, oldest first
# hash: delivery tag -> name of the worker that fetched it (its lease's name), written
# and deleted in the same transaction as kombu's ``unacked`` entry (workers/poison.py)
FETCHED_BY = "mmq:fetched-by"
# hash: delivery tag -> Redis server time (s) when a sweep first saw it in ``unacked``
# with no known fetcher: that message's age on one clock (core/broker/sweep.py)
UNACKED_SEEN = "mmq:unacked-seen"
# The run id of the Redis primary the last sweep talked to, and a flag (expiring) set
# while jobs whose message a new primary lacks are re-sent at once. One of each per Redis,
# whatever modalities a sweep covers: the primary is the same for every sweep, and keyed
# per modality set, the first sweep of a new set (`mmq requeue`: all three) took a
# stable primary for a new one (core/broker/sweep.py ``_new_primary``).
BROKER_RUN_ID = "mmq:broker-run-id"
BROKER_CHANGED = "mmq:broker-changed"


def worker_queues() -> list[Queue]:
    """What a worker consumes. Each queue on its own direct exchange: a queue declared
    without one lands on the default queue's exchange and key, and Redis then copies
    every text job into the image and audio queues too."""
    return [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES]


def producer_queues() -> list[Queue]:
    """What a producer publishes to: through the default exchange ("") with the
    queue's name as the routing key, the message goes straight onto that queue's list,
    with no binding-table lookup in Redis per message and no way onto another queue.
    It lands in the same list the worker's declaration reads."""
    return [Queue(q, Exchange(""), routing_key=q) for q in QUEUES]


def queue_keys(q: str) -> list[str]:
    """The Redis lists of one queue: kombu keeps one per priority step
    ("q", "q\\x06\\x163", "q\\x06\\x166", "q\\x06\\x169")."""
    return [q] + [f"{q}\x06\x16{p}" for p in (3, 6, 9)]


def all_queue_keys(queues: Iterable[str] = QUEUES) -> list[str]:
    return [k for q in queues for k in queue_keys(q)]


def job_ids(message: dict) -> list[str]:
    """The job ids a message (kombu's envelope, decoded) carries: a run_job's task id,
    or the list in a run_jobs message's arguments (core/broker/sender.py); [] if
    unreadable."""
    headers = message.get("headers") or {}
    if headers.get("task") != RUN_JOBS_TASK:
        job_id = headers.get("id")
        return [job_id] if isinstance(job_id, str) and job_id else []
    body = message.get("body", "")
    if (message.get("properties") or {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    ids = json.loads(body)[0][0]
    return [i for i in ids if isinstance(i, str) and i] if isinstance(ids, list) else []


def queued_job_ids(raw: bytes | str) -> list[str]:
    """The job ids of a message as kombu stores it in a queue; [] if unreadable."""
    try:
        return job_ids(json.loads(raw))
    except (ValueError, IndexError, TypeError, AttributeError, KeyError):
        return []


def unacked_job_ids(raw: bytes | str) -> list[str]:
    """The job ids of an entry of the ``unacked`` hash; [] if unreadable."""
    try:
        return job_ids(json.loads(raw)[0])
    except (ValueError, IndexError, TypeError, AttributeError, KeyError):
        return []
