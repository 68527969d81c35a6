"""Sending jobs to the workers by task name, without importing the workers.

A lone job goes as one ``run_job`` message whose Celery task id is its job id. Many jobs
of one modality sent together go ``per_message`` to a ``run_jobs`` message (job ids in
its arguments, task id a new uuid): a short text job's model time is about a
millisecond, and a message's own cost in Celery and kombu was half the worker's CPU per
job. The sweep reads the job ids of either kind (core/broker/queues.py ``job_ids``);
Flower shows a batch as one task whose arguments list its jobs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import redis
from celery import Celery
from kombu.exceptions import LimitExceeded, OperationalError

from core.broker.queues import (
    JOBS_HEADER,
    producer_queues,
    queue_keys,
)
from core.broker.redis_client import broker_transport_options, redis_for
from core.broker.transport import FILLING_TRANSPORTS, install
from core.config import Settings
from core.jobs import QUEUES, RUN_JOB_TASK, RUN_JOBS_TASK

# Seconds a send waits for one of the app's pooled broker connections (broker_pool_limit:
# 10). A burst of 40 API threads publishing a few jobs each waits milliseconds.
POOL_ACQUIRE_TIMEOUT_S = 10.0


def producer_app(settings: Settings) -> Celery:
    app = Celery("mmq-producer", broker=settings.broker_url)
    app.conf.update(
        task_serializer="json", accept_content=["json"],
        # max_retries 0: a send's connection set-up fails at its first refusal. kombu's
        # default retried with sleeps (3 connects, ~6 s a send, 12 s an SDK submit with
        # Redis down, holding an API thread as long), where the SDK already tries once
        # more on a new connection (a Sentinel failover) and leaves the rest queued for
        # the sweep. The workers' apps keep kombu's reconnecting.
        broker_transport_options={**broker_transport_options(settings), "max_retries": 0},
        broker_connection_retry=False, broker_connection_max_retries=0,
        # No "task-sent" events: each would be a second publish per job, halving the
        # submit rate; Flower follows jobs from the workers' received/started events.
        task_send_sent_event=False,
        task_queues=producer_queues(),
    )
    # A run_jobs message is followed by fillers, so a queue's length counts its jobs
    # (core/broker/transport.py); redis:// and sentinel:// only (not rediss).
    install(FILLING_TRANSPORTS)
    return app


def messages(jobs: Iterable[tuple[str, str]], per_message: int = 1
             ) -> list[tuple[str, list[str]]]:
    """(job_id, modality) pairs -> (modality, job ids) per message: each modality's jobs
    in submit order, at most ``per_message`` to a message, in as few messages as that
    allows and as even as they divide (65 jobs at 64: 33 and 32, not 64 and a lone one,
    which would make a message and a task of its own for one job)."""
    by_modality: dict[str, list[str]] = {}
    for job_id, modality in jobs:
        by_modality.setdefault(modality, []).append(job_id)
    out: list[tuple[str, list[str]]] = []
    for m, ids in by_modality.items():
        k = -(-len(ids) // max(1, per_message))  # messages
        size, extra = divmod(len(ids), k)  # the first ``extra`` carry one more
        start = 0
        for i in range(k):
            end = start + size + (i < extra)
            out.append((m, ids[start:end]))
            start = end
    return out


def send_jobs(app: Celery, jobs: Iterable[tuple[str, str]], per_message: int = 1) -> list[str]:
    """Publish (job_id, modality) pairs over one connection, up to ``per_message`` jobs
    of a modality per message; returns the ids sent."""
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
        for modality, ids in messages(jobs, per_message):
            kwargs = {"modality": modality}
            # The reprs Flower shows, made here: Celery's own (saferepr, a pure-Python
            # formatter) was a quarter of a submit's CPU; for a list of ids and a
            # one-key dict plain repr gives the same text.
            if len(ids) == 1:
                app.send_task(RUN_JOB_TASK, args=[ids[0]], kwargs=kwargs, queue=modality,
                              task_id=ids[0], producer=producer, retry=False,
                              argsrepr=repr([ids[0]]), kwargsrepr=repr(kwargs))
            else:
                app.send_task(RUN_JOBS_TASK, args=[ids], kwargs=kwargs, queue=modality,
                              task_id=str(uuid.uuid4()), producer=producer, retry=False,
                              headers={JOBS_HEADER: len(ids)},
                              argsrepr=_short(repr([ids]), app.amqp.argsrepr_maxsize),
                              kwargsrepr=repr(kwargs))
            sent += ids
    return sent


def _short(text: str, limit: int) -> str:
    """``text`` cut to Celery's length limit on a task's argument repr."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def queue_depths(settings: Settings, modalities: Iterable[str] = QUEUES,
                 client: redis.Redis | None = None) -> dict[str, int]:
    """Jobs waiting in each modality's queue (not counting fetched, unacked ones): a
    list's length, fillers included (core/broker/transport.py)."""
    r = client or redis_for(settings, socket_timeout=2)
    with r.pipeline(transaction=False) as pipe:
        mods = list(modalities)
        for q in mods:
            for key in queue_keys(q):
                pipe.llen(key)
        counts = pipe.execute()
    n = len(queue_keys(""))
    return {q: sum(counts[i * n:(i + 1) * n]) for i, q in enumerate(mods)}
