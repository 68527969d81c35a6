"""A worker's reply to Celery's ``stats`` broadcast carries its job count
(core/broker/stats.py), from the host's batching metrics: `mmq top` reads jobs there,
since Celery's ``total`` counts task messages and one run_jobs message holds many
jobs. Checked on Celery's own WorkController, built but not started."""

from __future__ import annotations

from types import SimpleNamespace

from core.broker.stats import WorkerJobStats
from core.config import Settings
from workers.app import make_app


def _stats(runtime) -> dict:
    app = make_app(Settings(broker_url="redis://127.0.0.1:1/0"))  # never connected
    if runtime is not None:
        app.attach_runtime(runtime)
    worker = app.WorkController(hostname="text-1@h", pool_cls="threads", concurrency=1,
                                without_gossip=True, without_mingle=True,
                                without_heartbeat=True)
    return worker.stats()


def test_the_stats_reply_carries_the_jobs_through_the_model():
    runtime = SimpleNamespace(host=SimpleNamespace(metrics=SimpleNamespace(jobs=129)))
    st = _stats(runtime)
    assert WorkerJobStats.from_stats(st) == WorkerJobStats(jobs=129)
    assert "total" in st and "uptime" in st  # Celery's own keys are all still there


def test_a_worker_without_a_runtime_sends_no_count():
    assert WorkerJobStats.from_stats(_stats(None)) is None
