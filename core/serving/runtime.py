"""What a worker process serves with: its model host and its lease, built together.

Built once by the worker's entry point (workers/__main__.py) before Celery consumes
anything, and held by the Celery app for its tasks (workers/app.py): no module-level
host, and nothing assigned after construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import Settings
from core.serving.host import ModelHost, start_host
from core.serving.lease import LeaseKeeper


@dataclass(frozen=True)
class WorkerRuntime:
    host: ModelHost
    lease: LeaseKeeper  # renewed by a thread the worker starts; abandon() from tasks

    def close(self) -> None:
        self.host.close()


def start_runtime(settings: Settings, device: str | None = None, *, modality: str,
                  worker: str) -> WorkerRuntime:
    host = start_host(settings, device, modality=modality, worker=worker)
    return WorkerRuntime(host, LeaseKeeper(host, worker, modality))
