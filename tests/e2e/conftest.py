"""Real services for end-to-end tests: a redis-server started here, a Redis database
per module or test, and real worker processes (``start_worker``). The databases
(``database_url``) are tests/conftest.py's; plain helpers are in tests/helpers.py."""

from __future__ import annotations

import subprocess
import time

import pytest
import redis

from tests.helpers import Worker, free_port

# Redis databases: enough for one per test module and per test that asks for its own.
# Numbers below FIRST_FREE_DB are left to modules that still hard-code theirs.
REDIS_DATABASES, FIRST_FREE_DB = 256, 16


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """Our own redis-server on a free port: no test touches the machine's Redis."""
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(d),
                             "--databases", str(REDIS_DATABASES)],
                            stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}"
    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        pytest.fail("redis-server did not start")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def new_broker(redis_server):
    """-> a function returning the URL of a Redis database no other test has used,
    flushed: no module or test sees another's messages, bindings or locks, whatever
    order they run in. For module-scoped stacks; tests use ``broker_url``."""
    numbers = iter(range(FIRST_FREE_DB, REDIS_DATABASES))

    def new() -> str:
        url = f"{redis_server}/{next(numbers)}"
        redis.Redis.from_url(url).flushdb()
        return url

    return new


@pytest.fixture
def broker_url(new_broker) -> str:
    """A Redis database of this test's own."""
    return new_broker()


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
