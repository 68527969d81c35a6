"""A worker's start: its model process loads while the worker migrates the store, the
worker itself never loads torch, and a start that cannot complete ends the worker with
its reason and leaves no model process behind."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from producer.sdk import Client
from tests.helpers import Worker, model_child, service_env


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _alive_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (a worker and its children)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "environ").read_bytes():
                    pids.append(int(d.name))
            except OSError:  # gone meanwhile, or not ours to read
                pass
    return pids


def test_the_worker_runs_jobs_without_torch_in_its_own_process(broker_url, tmp_path,
                                                                start_worker):
    db = f"sqlite:///{tmp_path / 'mmq.db'}"
    w = start_worker("text", service_env(broker_url, db))
    client = Client(broker_url=broker_url, database_url=db)
    (res,) = client.wait([client.submit_text("a sentence for a fresh worker")], timeout=60)
    client.close()
    assert res["status"] == "succeeded" and len(res["prediction"]["embedding"]) == 384
    # torch (about 470 MiB of the worker's memory, 2-3 s of its start) is the model
    # process's alone; the worker moves jobs between Redis, the pipe and SQL.
    assert "libtorch" not in _maps(w.proc.pid)
    assert "libtorch" in _maps(model_child(w))


def _start_fails(tmp_path, **env) -> tuple[int, str, str]:
    marker = f"MMQ_TEST_START={uuid.uuid4().hex}"
    key, value = marker.split("=")
    w = Worker("text", service_env(env.pop("broker"), env.pop("db"), **env, **{key: value}),
               tmp_path / "worker.log")
    try:
        code = w.proc.wait(120)
    finally:
        w.stop()
    return code, w.log.read_text(errors="replace"), marker


def test_a_model_that_cannot_load_ends_the_start_with_its_reason(broker_url, tmp_path):
    code, log, _ = _start_fails(tmp_path, broker=broker_url, db=f"sqlite:///{tmp_path / 'a.db'}",
                                MMQ_MODEL_PATH=str(tmp_path / "no-model-here"))
    assert code != 0
    assert "the model process failed to start" in log and "no config.json" in log


def test_a_store_that_cannot_be_migrated_ends_the_start_and_its_model_process(broker_url,
                                                                               tmp_path):
    # Nothing listens on port 9: the migration fails while the model process loads.
    code, log, marker = _start_fails(
        tmp_path, broker=broker_url, db="postgresql+psycopg://mmq@127.0.0.1:9/none")
    assert code != 0 and "OperationalError" in log
    end = time.monotonic() + 15
    while (left := _alive_with(marker)) and time.monotonic() < end:
        time.sleep(0.2)
    assert not left, f"processes of the failed start still run: {left}"
