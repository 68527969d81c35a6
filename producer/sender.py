"""Sending jobs to the workers by task name, without importing the workers.

A job's Celery task id is its job id, so a message in Redis can be matched to
its job (``requeue`` relies on it) and Flower shows the job id directly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

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
