"""Sending jobs to the workers by task name, without importing the workers.

A job's Celery task id is its job id, so a message in Redis can be matched to
its job (``requeue`` relies on it) and Flower shows the job id directly.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis
from celery import Celery
from kombu.exceptions import LimitExceeded, OperationalError

from core.broker.queues import (
    producer_queues,
    queue_keys,
)
from core.broker.redis_client import broker_transport_options, redis_for
from core.config import Settings
from core.jobs import QUEUES, RUN_JOB_TASK

# Seconds a send waits for one of the app's pooled broker connections (broker_pool_limit:
# 10). A burst of 40 API threads publishing a few jobs each waits milliseconds.
POOL_ACQUIRE_TIMEOUT_S = 10.0


def producer_app(settings: Settings) -> Celery:
    app = Celery("mmq-producer", broker=settings.broker_url)
    app.conf.update(
        task_serializer="json", accept_content=["json"],
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry=False, broker_connection_max_retries=0,
        # No "task-sent" events: each would be a second publish per job, halving the
        # submit rate; Flower follows jobs from the workers' received/started events.
        task_send_sent_event=False,
        task_queues=producer_queues(),
    )
    return app


def send_jobs(app: Celery, jobs: Iterable[tuple[str, str]]) -> list[str]:
    """Publish (job_id, modality) pairs over one connection; returns the ids sent."""
    sent = []
    # Not Celery's producer pool: it takes its connection from the connection pool
    # with no time limit (kombu's ProducerPool, whatever broker_pool_acquire_timeout
    # says), so once the pooled connections are all out a submit hung for ever (one
    # request of a 200-client burst did in CI). Here the wait is bounded: the send
    # fails, and the SDK leaves the job queued for the sweep.
    try:
        conn = app.pool.acquire(block=True, timeout=POOL_ACQUIRE_TIMEOUT_S)
    except LimitExceeded:
        raise OperationalError(f"no broker connection came free in {POOL_ACQUIRE_TIMEOUT_S} s "
                               f"(all {app.conf.broker_pool_limit} in use)") from None
    with conn, app.amqp.Producer(conn, auto_declare=False) as producer, \
            producer.batch(max_size=1000):
        # kombu buffers the LPUSHes of a batch in one Redis pipeline: one round
        # trip per thousand jobs instead of one (and a new client object) per job.
        for job_id, modality in jobs:
            app.send_task(RUN_JOB_TASK, args=[job_id], kwargs={"modality": modality},
                          queue=modality, task_id=job_id, producer=producer, retry=False)
            sent.append(job_id)
    return sent


def queue_depths(settings: Settings, modalities: Iterable[str] = QUEUES,
                 client: redis.Redis | None = None) -> dict[str, int]:
    """Messages waiting in each modality's queue (not counting fetched, unacked ones)."""
    r = client or redis_for(settings, socket_timeout=2)
    with r.pipeline(transaction=False) as pipe:
        mods = list(modalities)
        for q in mods:
            for key in queue_keys(q):
                pipe.llen(key)
        counts = pipe.execute()
    n = len(queue_keys(""))
    return {q: sum(counts[i * n:(i + 1) * n]) for i, q in enumerate(mods)}
