"""Real worker processes for end-to-end tests (``start_worker``). The redis-server,
its databases (``broker_url``, ``new_broker``) and the SQL databases (``database_url``)
are tests/conftest.py's; plain helpers are in tests/helpers.py."""

from __future__ import annotations

import pytest

from tests.helpers import Worker


@pytest.fixture
def start_worker(tmp_path):
    started: list[Worker] = []

    def start(modality: str, env: dict, concurrency: int = 4, wait: bool = True) -> Worker:
        w = Worker(modality, env, tmp_path / f"{modality}-{len(started)}.log", concurrency)
        started.append(w)
        if wait:
            w.wait_ready()
        return w

    yield start
    for w in started:
        w.stop()
