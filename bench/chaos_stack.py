"""One scenario's world for bench/chaos.py and its scenarios: the ``Stack`` (Redis, a
database behind a PostgreSQL proxy, workers, an API) and the run (``Load`` with its
``Fault``s, the ``Result`` and ``finish_result``). Apart from bench/chaos.py so that
bench/chaos_scenarios.py imports these without importing the script that imports it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

from bench.chaos_services import (
    _CLEANUPS,
    _DBS,
    PG_HOST,
    PG_PORT,
    RedisServer,
    Worker,
    create_pg,
    drop_pg,
    spawn,
    stop,
)
from bench.faults import TcpProxy, free_port
from core.jobs import TERMINAL
from core.training.samples import sentences
from producer.sdk import Client

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "chaos-key"
TERMINAL_SQL = ", ".join(f"'{s}'" for s in TERMINAL)


@dataclass
class Stack:
    """One scenario's world: Redis, a database, a PostgreSQL proxy, workers, an API."""

    tmp: Path
    db: str
    aof: bool = False
    worker_env: dict = field(default_factory=dict)

    def __post_init__(self):
        self.redis = RedisServer(self.tmp, self.aof)
        self.workers: list[Worker] = []
        self.api: subprocess.Popen | None = None
        self.proxy: TcpProxy | None = None
        if self.db == "postgresql":
            self.pg_name = create_pg()
            self.proxy = TcpProxy(PG_HOST, PG_PORT)
            _CLEANUPS.append(self.proxy.down)
            base = "postgresql+psycopg://postgres@"
            self.direct_url = f"{base}{PG_HOST}:{PG_PORT}/{self.pg_name}"
            self.service_url = f"{base}{self.proxy.address}/{self.pg_name}"
        else:
            self.pg_name = None
            self.direct_url = self.service_url = f"sqlite:///{self.tmp / 'mmq.db'}"
        self.client = Client(broker_url=self.redis.url, database_url=self.direct_url)
        self.engine = create_engine(self.direct_url, pool_pre_ping=True)

    def service_env(self, **extra) -> dict:
        env = dict(os.environ)
        env.update({"MMQ_BROKER_URL": self.redis.url, "MMQ_DATABASE_URL": self.service_url,
                    "MMQ_DEVICE": "cpu", "MMQ_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1",
                    "MMQ_WORKER_METRICS_PORT": "0", "PYTHONPATH": str(ROOT),
                    **self.worker_env, **{k: str(v) for k, v in extra.items()}})
        return env

    def start_api(self, **extra) -> str:
        port = free_port()
        env = self.service_env(MMQ_API_KEYS=API_KEY, **extra)
        self.api = spawn([sys.executable, "-c",
                          "import sys; from producer.cli import main; sys.exit(main())",
                          "api", "--port", str(port)], env, self.tmp / "api.log")
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            if self.api.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"mmq api did not start:\n{(self.tmp / 'api.log').read_text()}")

    def close(self) -> None:
        for w in self.workers:
            stop(w.proc)
        if self.api is not None:
            stop(self.api)
        self.client.close()
        self.engine.dispose()
        if self.proxy is not None:
            self.proxy.down()
        stop(self.redis.proc, 2)
        if self.pg_name:
            drop_pg(self.pg_name)
            _DBS.remove(self.pg_name)

    # -- what the store says -----------------------------------------------------------

    def scalar(self, sql: str, **params) -> int:
        with self.engine.connect() as c:
            return int(c.execute(text(sql), params).scalar() or 0)

    def open_jobs(self) -> int:
        return self.scalar(f"SELECT count(*) FROM jobs WHERE status NOT IN ({TERMINAL_SQL})")

    def running_on(self, w: Worker) -> list[str]:
        with self.engine.connect() as c:
            return list(c.execute(text("SELECT id FROM jobs WHERE status = 'running' AND "
                                       "worker LIKE :w"), {"w": w.name_like}).scalars())

    def fetched_unstarted(self) -> list[str]:
        """Jobs still ``queued`` whose message a worker has fetched and not acknowledged
        (kombu's ``unacked`` hash): a worker killed now never started them."""
        from core.broker.queues import UNACKED, unacked_job_ids

        r = self.redis.client()
        try:
            fetched = {j for raw in r.hvals(UNACKED) for j in unacked_job_ids(raw)}
        finally:
            r.close()
        if not fetched:
            return []
        with self.engine.connect() as c:
            queued = set(c.execute(text("SELECT id FROM jobs WHERE status = 'queued'"))
                         .scalars())
        return sorted(fetched & queued)

    def open_among(self, ids: list[str] | None) -> int:
        if ids is None:
            return self.open_jobs()
        with self.engine.connect() as c:
            done = set(c.execute(text(f"SELECT id FROM jobs WHERE status IN ({TERMINAL_SQL})"
                                      )).scalars())
        return len(set(ids) - done)

    def all_ids(self) -> list[str]:
        with self.engine.connect() as c:
            return list(c.execute(text("SELECT id FROM jobs")).scalars())

    def summary(self) -> dict:
        with self.engine.connect() as c:
            by = dict(c.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).all())
        return {
            "submitted": sum(by.values()), "succeeded": by.get("succeeded", 0),
            "failed": by.get("failed", 0) + by.get("cancelled", 0),
            "open": sum(n for s, n in by.items() if s not in TERMINAL),
            "no_pred": self.scalar(
                "SELECT count(*) FROM jobs j LEFT JOIN predictions p ON p.job_id = j.id "
                "WHERE j.status = 'succeeded' AND p.job_id IS NULL"),
            "dup": self.scalar("SELECT count(*) FROM (SELECT job_id FROM predictions "
                               "GROUP BY job_id HAVING count(*) > 1) d"),
            "reruns": self.scalar("SELECT count(*) FROM jobs WHERE attempts > 1"),
            "by_status": by,
        }

    def errors(self, limit: int = 3) -> list[str]:
        with self.engine.connect() as c:
            return [f"{n} x {e[:160]!r}" for e, n in c.execute(text(
                "SELECT error, count(*) FROM jobs WHERE status = 'failed' GROUP BY error "
                "ORDER BY count(*) DESC LIMIT :n"), {"n": limit}).all()]


# -- the run: paced submits, faults spread over it, recovery watched -------------------------

@dataclass
class Fault:
    """One injected fault: when it took effect and which jobs it concerns."""

    what: str
    t: float  # monotonic: the kill, or the service answering again
    watch: list[str] | None  # these jobs; None = every job (at the time of checking)
    recovered_s: float | None = None
    target_s: float | None = None
    scope: str = "in-flight"  # how the watched jobs were chosen, for the notes


@dataclass
class Result:
    name: str
    row: dict = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    passed: bool | None = None
    target: str = ""


class Load:
    """Submits ``n`` text jobs, keeping at most ``window`` open. It stops at the next
    fault's point until the driver sets ``release`` (its victim is ready), then
    submits that fault's share more, so that every fault meets jobs in flight."""

    def __init__(self, stack: Stack, n: int, n_faults: int, window: int = 200):
        self.stack, self.n, self.window = stack, n, window
        self.points = [n * (k + 1) // (n_faults + 1) for k in range(n_faults)]
        self.step = max(1, min(window, n // (n_faults + 1)))  # a fault's share of jobs
        self.fired = 0
        self.release = False
        self.submitted = 0
        self.texts = sentences(n, seed=7)
        self.errors: list[str] = []
        self.done = threading.Event()
        self._stop = threading.Event()
        self.faults: list[Fault] = []
        self.thread = threading.Thread(target=self._submit, daemon=True)
        self.watcher = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.watcher.start()

    def _submit(self) -> None:
        while self.submitted < self.n and not self._stop.is_set():
            gate = self.n if self.fired >= len(self.points) else (
                self.points[self.fired] + (self.step if self.release else 0))
            try:
                room = self.window - self.stack.open_jobs()
            except Exception as e:  # our direct connection hiccuped: try again
                self.errors.append(f"count: {type(e).__name__}")
                time.sleep(0.5)
                continue
            k = min(25, room, gate - self.submitted, self.n - self.submitted)
            if k <= 0:
                time.sleep(0.1)
                continue
            batch = self.texts[self.submitted:self.submitted + k]
            try:
                self.stack.client.submit_many([{"modality": "text", "input": t}
                                               for t in batch])
                self.submitted += k
            except Exception as e:
                self.errors.append(f"submit: {type(e).__name__}: {e}"[:200])
                time.sleep(0.5)
        self.done.set()

    def wait_point(self, timeout: float = 600) -> None:
        """Until the next fault's share of the jobs has been submitted."""
        end = time.monotonic() + timeout
        while self.submitted < self.points[self.fired] and time.monotonic() < end:
            time.sleep(0.1)

    def fire(self, fault: Fault) -> None:
        self.faults.append(fault)
        self.release = False
        self.fired += 1

    def _watch(self) -> None:
        while not self._stop.is_set():
            for f in list(self.faults):
                if f.recovered_s is None:
                    try:
                        if self.stack.open_among(f.watch) == 0:
                            f.recovered_s = time.monotonic() - f.t
                    except Exception:
                        pass
            time.sleep(0.5)

    def finish(self, timeout: float) -> bool:
        """Wait for the last submit, then for every job to be terminal."""
        end = time.monotonic() + timeout
        while not self.done.is_set() and time.monotonic() < end:
            time.sleep(0.5)
        ok = False
        while time.monotonic() < end:
            try:
                if self.done.is_set() and self.stack.open_jobs() == 0:
                    ok = True
                    break
            except Exception:
                pass
            time.sleep(0.5)
        time.sleep(1)  # let the watcher see the last recoveries
        self._stop.set()
        return ok


def finish_result(res: Result, stack: Stack, load: Load, *, fail_ok: bool = False) -> None:
    s = stack.summary()
    res.row = {"submitted": s["submitted"], "succeeded": s["succeeded"],
               "failed": s["failed"], "lost": s["open"] + s["no_pred"], "dup": s["dup"],
               "reruns": s["reruns"]}
    res.faults = load.faults
    rec = [f.recovered_s for f in load.faults]
    res.row["recover"] = ("-" if not rec else "never" if None in rec else f"{max(rec):.1f} s")
    in_target = all(f.recovered_s is not None and (f.target_s is None
                                                   or f.recovered_s <= f.target_s)
                    for f in load.faults)
    res.passed = (res.row["lost"] == 0 and res.row["dup"] == 0 and in_target
                  and (fail_ok or res.row["failed"] == 0) and s["submitted"] == load.n)
    if s["submitted"] != load.n:
        res.notes.append(f"only {s['submitted']} of {load.n} jobs could be submitted")
    if s["open"]:
        res.notes.append(f"not terminal at the end: {s['by_status']}")
    if s["no_pred"]:
        res.notes.append(f"{s['no_pred']} succeeded job(s) without a prediction")
    if s["failed"]:
        res.notes.append("failed: " + "; ".join(stack.errors()))
    for f in load.faults:
        got = "never" if f.recovered_s is None else f"{f.recovered_s:.1f} s"
        n = "all jobs" if f.watch is None else f"{len(f.watch)} {f.scope} job(s)"
        res.notes.append(f"{f.what}: {n} terminal after {got}")
    res.notes += sorted(set(load.errors))[:5]
