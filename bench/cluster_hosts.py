"""The hosts of bench/cluster.py (and tests/e2e/test_cluster.py): a services host
(PostgreSQL proxy, Redis primary + replica + three sentinels, the API), a producer
host, and worker hosts each under its own clock offset (``faketime``), all network
namespaces on this machine (bench/netns.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.netns import Host, Net  # noqa: E402

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"  # trust auth, as in CI
API_KEY = "cluster-key"
MASTER = "mymaster"  # the Sentinel name of the Redis primary
REDIS_PORTS = (6379, 6380)  # primary, replica (at start; Sentinel may swap them)
SENTINEL_PORTS = (26379, 26380, 26381)
METRICS_PORTS = {"text": 9101, "image": 9102, "audio": 9103}


@dataclass
class WorkerSpec:
    host: str  # "w1"
    offset: str  # faketime's offset: "+10m", "-3m"; "" = the real clock
    modalities: tuple[str, ...]


@dataclass
class Worker:
    host: Host
    modality: str
    offset: str
    log: Path
    proc: subprocess.Popen | None = None
    starts: int = 0
    incarnation: str = ""

    def main_pid(self) -> int | None:
        """The ``python -m workers`` process (faketime runs it as its child)."""
        needle = f"-m\0workers\0{self.modality}\0".encode()
        for pid in self.host.pids():
            try:
                if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        return None

    def ready(self) -> bool:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.count(" ready.") >= self.starts

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Cluster:
    tmp: Path
    workers_spec: list[WorkerSpec]
    broker: str = "sentinel"  # or "redis": MMQ_BROKER_URL names the primary itself
    env_extra: dict = field(default_factory=dict)
    concurrency: int = 32
    pg_admin: str = PG_ADMIN  # a local server; the hosts reach it through the proxy

    def __post_init__(self):
        self.net = Net(["svc", "prod", *[w.host for w in self.workers_spec]])
        self.svc = self.net["svc"]
        self.db = f"mmq_cluster_{uuid.uuid4().hex[:10]}"
        self.workers: list[Worker] = []
        self.redis: dict[int, subprocess.Popen] = {}
        self.api_url = f"http://{self.svc.ip}:8000"
        self.producer: subprocess.Popen | None = None
        self._db_made = False
        self._proxy: subprocess.Popen | None = None

    # -- start ----------------------------------------------------------------------------

    def start(self) -> None:
        import psycopg

        with psycopg.connect(self.pg_admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
        self._db_made = True
        pg = urlsplit(self.pg_admin)
        user = pg.username or "postgres"
        self.direct_url = f"postgresql+psycopg://{user}@{pg.hostname}:{pg.port or 5432}/{self.db}"
        self.service_db_url = f"postgresql+psycopg://{user}@{self.svc.ip}:5432/{self.db}"
        # The proxy lives in the root namespace (it must reach 127.0.0.1:5432) and
        # listens inside the services host.
        self._proxy = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "netns.py"), "proxy", self.svc.ns,
             f"{self.svc.ip}:5432", f"{pg.hostname}:{pg.port or 5432}"],
            stdout=open(self.tmp / "pg-proxy.log", "ab"), stderr=subprocess.STDOUT)
        self._start_redis()
        self._start_api()
        for spec in self.workers_spec:
            for m in spec.modalities:
                w = Worker(self.net[spec.host], m, spec.offset,
                           self.tmp / f"{spec.host}-{m}.log")
                self.workers.append(w)
                self.start_worker(w)
        self.wait_ready(self.workers)

    def _redis_cmd(self, port: int, *extra: str) -> list[str]:
        d = self.tmp / f"redis-{port}"
        d.mkdir(exist_ok=True)
        return ["redis-server", "--port", str(port), "--bind", self.svc.ip,
                "--protected-mode", "no", "--save", "", "--appendonly", "no",
                "--dir", str(d), *extra]

    def start_redis(self, port: int) -> None:
        """(Re)start one redis-server; a restarted old primary is made a replica by
        the sentinels."""
        extra = () if port == REDIS_PORTS[0] and port not in self.redis else (
            "--replicaof", self.svc.ip, str(REDIS_PORTS[0]))
        if port in self.redis and self.broker == "sentinel":
            extra = ("--replicaof", self.svc.ip, str(self.primary_port()))
        self.redis[port] = self.svc.spawn(self._redis_cmd(port, *extra), dict(os.environ),
                                          self.tmp / f"redis-{port}.log")

    def _start_redis(self) -> None:
        for port in REDIS_PORTS:
            self.start_redis(port)
        for port in SENTINEL_PORTS:
            conf = self.tmp / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind {self.svc.ip}\nprotected-mode no\n"
                f"dir {self.tmp}\n"
                f"sentinel monitor {MASTER} {self.svc.ip} {REDIS_PORTS[0]} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 2000\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                f"sentinel parallel-syncs {MASTER} 1\n")
            self.redis[port] = self.svc.spawn(["redis-sentinel", str(conf)], dict(os.environ),
                                              self.tmp / f"sentinel-{port}.log")
        self._until(lambda: self.primary_port() == REDIS_PORTS[0], 30, "sentinels")

    def primary_port(self) -> int | None:
        """The primary's port as the sentinels report it."""
        import redis

        for port in SENTINEL_PORTS:
            try:
                addr = redis.Redis(self.svc.ip, port, socket_timeout=1).execute_command(
                    "SENTINEL", "get-master-addr-by-name", MASTER)
                if addr:
                    return int(addr[1])
            except redis.RedisError:
                continue
        return None

    @property
    def broker_url(self) -> str:
        if self.broker == "redis":
            return f"redis://{self.svc.ip}:{REDIS_PORTS[0]}/0"
        first, *rest = (f"sentinel://{self.svc.ip}:{p}" for p in SENTINEL_PORTS)
        return ";".join([f"{first}/0", *rest])  # the form README's MMQ_BROKER_URL gives

    def env(self, **extra) -> dict:
        env = dict(os.environ)
        env.update({"MMQ_BROKER_URL": self.broker_url, "MMQ_DATABASE_URL": self.service_db_url,
                    "MMQ_SENTINEL_MASTER": MASTER,
                    "MMQ_DEVICE": "cpu", "MMQ_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                    "MMQ_API_KEYS": f"cluster:{API_KEY}", **self.env_extra,
                    **{k: str(v) for k, v in extra.items()}})
        return env

    def _start_api(self) -> None:
        self.api = self.svc.spawn(
            [sys.executable, "-c", "import sys; from producer.cli import main; sys.exit(main())",
             "api", "--host", self.svc.ip, "--port", "8000"], self.env(),
            self.tmp / "api.log", cwd=ROOT)

        def up() -> bool:
            try:
                return httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        self._until(up, 120, "the API", self.tmp / "api.log")

    def start_worker(self, w: Worker) -> None:
        argv = [sys.executable, "-m", "workers", w.modality, "--concurrency",
                str(self.concurrency if w.modality == "text" else 16)]
        env = self.env(MMQ_WORKER_METRICS_PORT=METRICS_PORTS[w.modality],
                       MMQ_WORKER_METRICS_HOST="0.0.0.0")
        if w.offset:
            argv = ["faketime", "-f", w.offset, *argv]
            env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"  # only the wall clock moves
            # time.sleep fails under libfaketime 0.9.10: see faketime_site/sitecustomize.py
            env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'bench' / 'faketime_site'}"
        w.starts += 1
        w.incarnation = f"{w.host.name}-{w.modality}-{w.starts}"
        w.proc = w.host.spawn(argv, env, w.log, cwd=ROOT)

    def wait_ready(self, workers: list[Worker], timeout: float = 300) -> float:
        t0 = time.monotonic()
        for w in workers:
            self._until(w.ready, timeout - (time.monotonic() - t0), f"worker {w.incarnation}",
                        w.log, w.alive)
        return time.monotonic() - t0

    def _until(self, cond, timeout: float, what: str, log: Path | None = None,
               alive=None) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if alive is not None and not alive():
                raise RuntimeError(f"{what} exited:\n{log.read_text()[-3000:] if log else ''}")
            if time.monotonic() > end:
                raise TimeoutError(f"{what} not up:\n{log.read_text()[-3000:] if log else ''}")
            time.sleep(0.2)

    # -- faults -----------------------------------------------------------------------------

    def stop_worker(self, w: Worker, grace: float = 60) -> None:
        """SIGTERM to the worker's main process (Celery's warm shutdown), as an
        orchestrator does when it replaces a container."""
        pid = w.main_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        try:
            w.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(w.proc.pid, signal.SIGKILL)
            w.proc.wait(10)

    def kill_redis_primary(self) -> int:
        port = self.primary_port()
        self.redis[port].kill()
        self.redis[port].wait()
        return port

    # -- the producer host --------------------------------------------------------------------

    def start_producer(self, ctl: Path, out: Path) -> None:
        ctl.write_text(json.dumps({"allow": 0}))
        mods = {m for w in self.workers_spec for m in w.modalities}
        self.producer = self.net["prod"].spawn(
            [sys.executable, str(ROOT / "bench" / "cluster_producer.py"), self.api_url,
             API_KEY, str(ctl), str(out), *(["--text-only"] if mods == {"text"} else [])],
            self.env(), self.tmp / "producer.log", cwd=ROOT)
        self._until(lambda: "producer ready" in (self.tmp / "producer.log").read_text(), 120,
                    "the producer", self.tmp / "producer.log", lambda: self.producer.poll() is None)

    # -- metrics --------------------------------------------------------------------------------

    def late_dropped(self, w: Worker) -> float | None:
        """mmq_late_outcomes_dropped_total of this worker's exporter, or None."""
        try:
            r = httpx.get(f"http://{w.host.ip}:{METRICS_PORTS[w.modality]}/metrics", timeout=1)
        except httpx.HTTPError:
            return None
        vals = re.findall(r"^mmq_late_outcomes_dropped_total(?:\{[^}]*\})? ([0-9.e+]+)$",
                          r.text, re.M)
        return sum(float(v) for v in vals) if vals else None

    # -- stop -------------------------------------------------------------------------------------

    def close(self) -> None:
        if self.producer is not None and self.producer.poll() is None:
            self.producer.kill()
        self.net.close()  # every process inside the hosts
        if self._proxy is not None:
            self._proxy.kill()
            self._proxy.wait()
        if self._db_made:
            import psycopg

            try:
                with psycopg.connect(self.pg_admin, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
            except Exception as e:  # noqa: BLE001
                print(f"could not drop database {self.db}: {e}", file=sys.stderr)
            self._db_made = False
