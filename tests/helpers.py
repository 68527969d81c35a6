"""Plain helpers the tests share (the fixtures are in the conftest.py files): PostgreSQL
databases made and dropped, real worker processes, their environment, a wait for an
HTTP server, and inputs more than one test module builds. Test modules import from
here, never from another test module or a conftest; the fault injectors (TcpProxy,
SentinelCluster) and ``free_port`` are bench/faults.py's, shared with bench/chaos.py."""

from __future__ import annotations

import functools
import io
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from PIL import Image

from bench.faults import free_port  # noqa: F401  (the one free_port, re-exported here)

ROOT = Path(__file__).parents[1]


def needs_bf16():
    """Skip where bf16 does not run: a CPU whose oneDNN has no bf16 kernels (no AVX-512).
    bf16 resolves to fp32 there (tests/core/model/test_precision.py checks), so a bf16
    quality bound has nothing to measure."""
    import pytest
    import torch

    from core.model import precision as P

    runs = P.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # the rule itself
    return pytest.mark.skipif(not runs, reason="this CPU has no bf16 kernels (oneDNN: AVX-512)")


def assert_rows_close(got: np.ndarray, want: np.ndarray, version: str, atol: float = 1e-4):
    """Vectors computed in other batches than their reference, row by row: within
    ``atol`` where the version ran fp32; where it ran bf16 (a "/bf16" tag), within
    cosine 0.9999 and 3e-3, since a bf16 row moves with its batch's shape (oneDNN's
    AMX kernels block by the number of rows: up to 7e-4 seen, cosine 0.99999). Either
    bound still tells one job's vector from another's."""
    assert got.shape == want.shape, (got.shape, want.shape)
    if "/bf16" not in version:
        assert np.abs(got - want).max() <= atol
        return
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.9999 and np.abs(got - want).max() <= 3e-3, (cos.min(),
                                                                       np.abs(got - want).max())


PG_ADMIN_URL = os.environ.get("MMQ_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


# -- PostgreSQL databases --------------------------------------------------------------------

def pg_database(name: str) -> str:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{name}"


def pg_drop(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- real processes ----------------------------------------------------------------------------

class Worker:
    """A real `python -m workers <modality>` process and its log."""

    def __init__(self, modality: str, env: dict, log: Path, concurrency: int = 4):
        self.modality, self.log = modality, log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers", modality, "--concurrency", str(concurrency)],
            env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
            cwd=ROOT)

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


def model_child(worker: Worker) -> int:
    """The pid of the worker's spawned model process (not multiprocessing's resource
    tracker, the other child a spawning process may have)."""
    pid = worker.proc.pid
    children = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children |= {int(c) for c in (task / "children").read_text().split()}
    for c in children:
        cmdline = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:
            return c
    raise AssertionError(f"worker {pid} has no model process among {children}")


def service_env(broker_url: str, database_url: str, **extra) -> dict:
    env = dict(os.environ)
    env.update({"MMQ_BROKER_URL": broker_url, "MMQ_DATABASE_URL": database_url,
                "MMQ_DEVICE": "cpu", "MMQ_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1",
                # No exporter unless a test asks: three workers would contend for 9100.
                "MMQ_WORKER_METRICS_PORT": "0",
                **{k: str(v) for k, v in extra.items()}})
    return env


@contextmanager
def served_app(settings) -> Iterator[str]:
    """The real app (``create_app(settings)``) under uvicorn in a thread -> its base URL."""
    import uvicorn

    from bench.faults import free_port as _port
    from producer.api import create_app

    port = _port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_http(url: str, proc: subprocess.Popen, log, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"mmq api exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"mmq api did not answer:\n{log.read_text()[-3000:]}")


# -- inputs ------------------------------------------------------------------------------------

def speak(text: str, voice: str = "en-gb-x-rp+m2") -> np.ndarray:
    """espeak-ng speech (the Debian package .ci/run installs), 16 kHz mono float32."""
    import torch
    import torchaudio

    wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], check=True,
                         capture_output=True).stdout
    x, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return torchaudio.functional.resample(torch.from_numpy(x), rate, 16_000).numpy()


def wav_claiming(rate: int) -> bytes:
    """A valid 0.1 s float32 WAV whose header says ``rate`` samples per second."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros(1600, dtype="float32"), 16000, format="WAV", subtype="FLOAT")
    data = bytearray(buf.getvalue())
    data[24:28] = struct.pack("<I", rate)
    data[28:32] = struct.pack("<I", (rate * 4) % 2**32)  # byte rate; soundfile ignores it
    return bytes(data)


@functools.cache
def big_png() -> bytes:
    """8000 x 8000 = 64 M pixels, over mmq's 40 M limit and under Pillow's own guard
    (~179 M); uniform, so ~60 kB of bytes."""
    buf = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buf, format="PNG")
    return buf.getvalue()


def cut_images() -> dict[str, bytes]:
    """Images cut short in transit: a PNG without its IEND chunk (Pillow decoded it) and
    a JPEG cut in half."""
    arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    out = {}
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    return {"png without IEND": out["PNG"][:-12], "jpeg cut in half":
            out["JPEG"][:len(out["JPEG"]) // 2]}


# Two small classes of sentences: fine-tuning (tests/core/training) and the versions
# served during a stream of jobs (tests/e2e/test_versions.py) train on them.
SPORT = ["the striker scored twice in the final", "a late goal won the derby",
         "the team lost the cup match", "she won the marathon in record time",
         "the coach praised his defenders", "the tennis final went to five sets"]
FINANCE = ["the central bank raised interest rates", "shares fell after the earnings call",
           "bond yields climbed again", "the company issued new stock",
           "inflation pushed mortgage costs up", "the fund sold its bank shares"]


def write_labelled(root, rows: dict[str, list[str]]) -> None:
    """``root/<label>/<i>.txt``, one text each: the labelled-folder layout."""
    for label, texts in rows.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i, t in enumerate(texts):
            (root / label / f"{i}.txt").write_text(t)


# -- jobs as a worker leaves them --------------------------------------------------------

def add_job(app, owner: str | None, *, modality="text", text=None, payload=None,
            status="queued", result=None, error=None) -> str:
    """A classify job (labels a, b) in the app's store: queued, failed, or finished with
    ``result``, as a worker would leave it."""
    from core import store

    client = app.state.client
    with client.sessions.begin() as s:
        job = store.create_job(session=s, modality=modality, task="classify",
                               params={"labels": ["a", "b"], "top_k": 2}, text=text,
                               payload=payload, owner=owner)
        job_id = job.id
    with client.sessions.begin() as s:
        if result is not None or status == "failed":
            store.start_jobs(session=s, job_ids=[job_id], worker="w")
        if result is not None:
            store.finish_jobs(session=s, model_version="test", results={job_id: result},
                              attempts={job_id: 1})
        elif status == "failed":
            store.fail_job(session=s, job_id=job_id, error=error or "failed", attempt=1)
    return job_id


SQL_STATEMENT = "UPDATE jobs SET sent_at=CURRENT_TIMESTAMP WHERE jobs.id IN (?, ?)"


def raise_sql_error(*_a, **_kw):
    """Raise what SQLAlchemy raises on a locked SQLite store: its message carries the
    statement and its parameters (here "job-secret-..."), which no log line may."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    raise OperationalError(SQL_STATEMENT, ("job-secret-1", "job-secret-2"),
                           sqlite3.OperationalError("database is locked"))


def brief_warnings(records) -> list[str]:
    """The WARNING lines among ``records``, each checked to be one line with the
    driver's message of ``raise_sql_error`` and neither the statement nor a parameter."""
    warned = [r.getMessage() for r in records if r.levelname == "WARNING"]
    for line in warned:
        assert "OperationalError: database is locked" in line, line
        assert "UPDATE jobs" not in line and "job-secret" not in line, line
        assert "\n" not in line, line
    return warned
