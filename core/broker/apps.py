"""The Celery configuration every mmq process shares, and the monitoring app.

Workers (workers/app.py) add their task module, consumer and poison guards to
``celery_conf``; Flower loads ``monitor`` (``-A core.broker.apps:monitor``): the
broker, the queues and the task events, without the task module, whose import
loads torch (about 500 MB of Flower's resident memory).
"""

from __future__ import annotations

from celery import Celery

from core.broker.queues import worker_queues
from core.broker.redis_client import broker_transport_options
from core.config import Settings, get_settings
from core.jobs import QUEUES


def route_by_modality(name, args, kwargs, options, task=None, **kw):
    """Every job goes to its modality's queue; a worker consumes exactly one."""
    modality = (kwargs or {}).get("modality")
    return {"queue": modality} if modality in QUEUES else None


def celery_conf(s: Settings) -> dict:
    return dict(
        # JSON only: a pickle payload from the broker would be code execution.
        task_serializer="json", accept_content=["json"],
        result_serializer="json", result_accept_content=["json"],
        # Results live in SQL (the store), not in a Celery result backend.
        task_ignore_result=True,
        # Ack after the prediction is stored; a worker killed mid-job leaves the
        # message to be redelivered, and the store's upsert keeps one prediction.
        task_acks_late=True, task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # visibility_timeout; master_name for a sentinel:// URL (core/broker/redis_client.py).
        broker_transport_options=broker_transport_options(s),
        broker_connection_retry_on_startup=True,
        task_queues=worker_queues(),  # core/broker/queues.py: why each has its exchange
        task_default_queue=QUEUES[0],
        task_routes=(route_by_modality,),
        # Events for Flower: per-job task lifecycle.
        worker_send_task_events=True, task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )


def monitor_app(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    app = Celery("mmq", broker=s.broker_url)
    app.conf.update(celery_conf(s))
    return app


monitor = monitor_app()
