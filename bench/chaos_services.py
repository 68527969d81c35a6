"""The services bench/chaos.py starts and always stops: redis-servers, PostgreSQL
databases, worker processes; and the clean-up that runs however the script exits."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Protocol

import redis

from bench.faults import free_port

ROOT = Path(__file__).resolve().parents[1]
PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"


# -- cleanup: everything this script started, stopped however it exits ----------------------

_PROCS: list[subprocess.Popen] = []
_DBS: list[str] = []
_CLEANUPS: list = []


def _kill_group(p: subprocess.Popen) -> None:
    """Our processes are session leaders: their children (the model process, its
    resource tracker) go with them."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        pass


def cleanup_all() -> None:
    while _CLEANUPS:
        try:
            _CLEANUPS.pop()()
        except Exception as e:  # keep cleaning
            print(f"cleanup: {e}", file=sys.stderr)
    while _PROCS:
        _kill_group(_PROCS.pop())
    while _DBS:
        drop_pg(_DBS.pop())


atexit.register(cleanup_all)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def spawn(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(log, "ab"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    _PROCS.append(p)
    return p


def stop(p: subprocess.Popen, grace: float = 10) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(p)  # also the model process of a worker whose main process was killed
    if p in _PROCS:
        _PROCS.remove(p)


# -- services ------------------------------------------------------------------------------

class RedisServer:
    """A private redis-server; ``kill9`` and ``start`` again on the same port, with
    its data dir kept (AOF) or a fresh one (restarted empty)."""

    def __init__(self, tmp: Path, aof: bool):
        self.tmp, self.aof, self.port = tmp, aof, free_port()
        self.dir = tmp / "redis"
        self.dir.mkdir()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self, empty: bool = False) -> None:
        if empty:
            shutil.rmtree(self.dir)
            self.dir.mkdir()
        self.proc = spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                           "--save", "", "--appendonly", "yes" if self.aof else "no",
                           "--dir", str(self.dir)], dict(os.environ), self.tmp / "redis.log")
        r = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                r.ping()
                return
            except redis.RedisError:  # includes "loading the dataset in memory"
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()
        _PROCS.remove(self.proc)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)


def create_pg() -> str:
    import psycopg

    name = f"mmq_chaos_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    _DBS.append(name)
    return name


def drop_pg(name: str) -> None:
    import psycopg

    try:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception as e:
        print(f"could not drop database {name}: {e}", file=sys.stderr)


class WorkerHome(Protocol):
    """What a worker needs of the stack it joins (bench/chaos_stack.py's ``Stack``), named
    here so that this module does not import the one that imports it."""

    tmp: Path
    workers: list

    def service_env(self) -> dict[str, str]: ...


class Worker:
    """A real ``python -m workers text`` process."""

    def __init__(self, stack: WorkerHome, concurrency: int):
        self.log = stack.tmp / f"worker-{len(stack.workers)}.log"
        self.proc = spawn([sys.executable, "-m", "workers", "text", "--concurrency",
                           str(concurrency)], stack.service_env(), self.log)
        self.pid = self.proc.pid
        stack.workers.append(self)

    @property
    def name_like(self) -> str:
        return f"text-{self.pid}.%@%"  # workers are named <modality>-<pid>.<nonce>@<host>

    def ready(self) -> bool:
        return " ready." in self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 240) -> None:
        end = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > end:
                raise TimeoutError(f"worker not ready:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def model_child(self) -> int | None:
        """The spawned model process among the worker's children (not the
        multiprocessing resource tracker)."""
        try:
            kids = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            return None
        for k in kids:
            try:
                cmd = Path(f"/proc/{k}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmd:
                return int(k)
        return None
