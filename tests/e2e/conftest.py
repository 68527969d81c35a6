"""Real services for end-to-end tests: a redis-server started here, SQLite files and
PostgreSQL databases created per session, and real worker processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

PG_ADMIN_URL = os.environ.get("MMQ_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
# Redis databases: enough for one per test module and per test that asks for its own.
# Numbers below FIRST_FREE_DB are left to modules that still hard-code theirs.
REDIS_DATABASES, FIRST_FREE_DB = 256, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """Our own redis-server on a free port: no test touches the machine's Redis."""
    port = _free_port()
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


def _pg_database(name: str) -> str:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{name}"


def _pg_drop(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'mmq.db'}"
        return
    name = f"mmq_e2e_{uuid.uuid4().hex[:10]}"
    yield _pg_database(name)
    _pg_drop(name)


class Worker:
    """A real `python -m workers <modality>` process and its log."""

    def __init__(self, modality: str, env: dict, log: Path, concurrency: int = 4):
        self.modality, self.log = modality, log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers", modality, "--concurrency", str(concurrency)],
            env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[2])

    def wait_ready(self, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.log.read_text(errors="replace")
            if " ready." in text:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.modality} exited:\n{text[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"worker {self.modality} not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def service_env(broker_url: str, database_url: str, **extra) -> dict:
    env = dict(os.environ)
    env.update({"MMQ_BROKER_URL": broker_url, "MMQ_DATABASE_URL": database_url,
                "MMQ_DEVICE": "cpu", "MMQ_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1",
                # No exporter unless a test asks: three workers would contend for 9100.
                "MMQ_WORKER_METRICS_PORT": "0",
                **{k: str(v) for k, v in extra.items()}})
    return env


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
