"""Model versions end to end: two real text workers serve a stream of jobs while
versions are promoted and rolled back; every job runs exactly once, with the version
it was resolved to when it started (or the one it named), and no worker restarts."""

from __future__ import annotations

import threading
import time

from sqlalchemy import func, select

from core import store
from core.config import Settings
from core.training.finetune import FinetuneConfig
from producer.sdk import Client
from tests.helpers import FINANCE, SPORT, service_env, write_labelled

LABELS = ["alpha", "omega"]


def test_promote_and_rollback_during_a_stream(broker_url, database_url, tmp_path,
                                              start_worker):
    db_url = database_url  # a SQLite file and a PostgreSQL database: one run each
    adapters = tmp_path / "adapters"
    settings = Settings(broker_url=broker_url, database_url=db_url,
                        adapters_dir=str(adapters))
    client = Client(settings=settings)
    write_labelled(tmp_path / "data", {"alpha": SPORT, "omega": FINANCE})
    cfg = FinetuneConfig(held_out=0.34, val=0.0, max_epochs=30, patience=30)
    va = client.train("text", tmp_path / "data", "t-a", config=cfg, progress=False)
    vb = client.train("text", tmp_path / "data", "t-b", progress=False,
                      config=FinetuneConfig(held_out=0.34, val=0.0, max_epochs=30,
                                            patience=30, seed=7))
    exact = {"t-a": f"t-a@{va['adapter_sha256'][:12]}", "t-b": f"t-b@{vb['adapter_sha256'][:12]}"}

    env = service_env(broker_url, db_url, MMQ_ADAPTERS_DIR=str(adapters), MMQ_MAX_WAIT_MS=20)
    workers = [start_worker("text", env), start_worker("text", env)]

    ids: list[str] = []
    named: dict[str, str] = {}
    stop = threading.Event()

    def stream() -> None:
        n = 0
        while not stop.is_set():
            items = [{"modality": "text", "input": f"{SPORT[n % 6]} ({n}.{i})",
                      "task": "classify", "labels": LABELS} for i in range(4)]
            items[n % 4]["model_version"] = ("t-b", "base", "t-a", "t-b")[n % 4]
            new = client.submit_many(items)
            ids.extend(new)
            named[new[n % 4]] = items[n % 4]["model_version"]
            n += 1
            time.sleep(0.2)

    thread = threading.Thread(target=stream)
    thread.start()
    marks: list[tuple[object, str]] = []  # (committed by this instant, jobs run this)

    def done_count() -> int:
        with client.sessions() as s:
            return s.scalar(select(func.count()).select_from(store.Job).where(
                store.Job.status == "succeeded"))

    def phase(action, serving: str) -> None:
        target = done_count() + 40  # let a share of the stream run in each phase
        while done_count() < target:
            time.sleep(0.1)
        action()
        marks.append((store.utcnow(), serving))

    try:
        phase(lambda: client.promote("t-a"), "t-a")
        phase(lambda: client.promote("t-b"), "t-b")
        phase(lambda: client.rollback("text"), "t-a")
        phase(lambda: None, "t-a")
    finally:
        stop.set()
        thread.join()
    results = client.wait(ids, timeout=300, with_embedding=False)

    assert all(w.proc.poll() is None for w in workers)  # no restart was needed
    assert [r["status"] for r in results].count("succeeded") == len(ids)
    with client.sessions() as s:
        n_pred = s.scalar(select(func.count()).select_from(store.Prediction).where(
            store.Prediction.job_id.in_(ids)))
    assert n_pred == len(ids)  # exactly one prediction each
    assert {r["attempts"] for r in results} == {1}  # and none ran twice
    seen = set()
    for r in results:
        got = r["prediction"]["model_version"]
        assert got == r["model_version"]  # the job row and its prediction agree
        if r["id"] in named:
            want = named[r["id"]]
            assert got == exact[want] if want != "base" else got not in exact.values()
            continue
        # A job that started after a promote or rollback had committed ran what it made
        # the default, whichever worker took it. (One that started just before may have
        # been resolved either way: its start time is taken before its UPDATE runs.)
        started = _utc(r["started_at"])
        after = [version for at, version in marks if started > at]
        if after:
            assert got == exact[after[-1]], (r["id"], started, marks)
        seen.add(got)
    # Every phase really ran: the base tower first, then each promoted version.
    assert {exact["t-a"], exact["t-b"]} <= seen and len(seen) == 3


def _utc(text: str):
    from datetime import UTC, datetime

    d = datetime.fromisoformat(text)
    return d if d.tzinfo else d.replace(tzinfo=UTC)
