"""Monitoring against real services: a real Flower process and `mmq top` on a real
redis-server (the session fixture) and a SQLite store; Flower's task list also in
headless Chromium (screenshot: $MMQ_ARTIFACTS/flower/tasks.png)."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis

from core import store
from core.broker.sender import producer_app, send_jobs
from core.config import Settings
from core.store.migrations import upgrade
from producer.ops.flower import FlowerAuthMissing, flower_command, flower_credentials, flower_env
from producer.ops.top import collect, render
from producer.sdk import Client
from tests.e2e.browser import chrome, screenshot
from tests.helpers import free_port, service_env

ROOT = Path(__file__).parents[2]
AUTH = ("alice", "s3cret-for-tests")
# Redis db numbers of their own: test_pipeline takes 1, 2, ... per database run.


class FlowerProcess:
    def __init__(self, env: dict, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(flower_command(self.port, "127.0.0.1"), env=env, cwd=ROOT,
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower exited:\n{self.log.read_text()[-3000:]}")
            try:
                # /healthcheck is Flower's one open route: it says nothing but "OK".
                if httpx.get(f"{self.url}/healthcheck", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"flower did not answer:\n{self.log.read_text()[-3000:]}")

    def get(self, path: str, auth=AUTH, **kw) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", auth=auth, timeout=10, **kw)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def flower(new_broker, tmp_path_factory):
    """One Flower for the module: it loads the Celery app (and so torch), which
    takes a while on a small machine."""
    url = new_broker()
    tmp = tmp_path_factory.mktemp("flower")
    db = f"sqlite:///{tmp / 'mmq.db'}"
    env = flower_env(f"{AUTH[0]}:{AUTH[1]},bob:other-pass", service_env(url, db))
    f = FlowerProcess(env, tmp / "flower.log")
    f.wait_ready()
    yield f, url, db, env
    f.stop()


def test_flower_credentials_are_required_outside_local():
    with pytest.raises(FlowerAuthMissing):
        flower_credentials(Settings(profile="production", flower_basic_auth=""))
    with pytest.raises(FlowerAuthMissing):
        flower_credentials(Settings(profile="production", flower_basic_auth="no-colon"))
    assert flower_credentials(Settings(flower_basic_auth="a:b, c:d")) == ("a:b,c:d", False)
    auth, generated = flower_credentials(Settings(profile="local", flower_basic_auth=""))
    user, password = auth.split(":")
    assert generated and user == "mmq" and len(password) >= 12
    assert flower_credentials(Settings(profile="local"))[0] != auth  # one-off, per run


def test_mmq_flower_refuses_to_start_without_auth(broker_url):
    env = service_env(broker_url, "sqlite://", MMQ_FLOWER_BASIC_AUTH="",
                      MMQ_PROFILE="production")
    r = subprocess.run([sys.executable, "-m", "producer.cli", "flower", "--port",
                        str(free_port())], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "MMQ_FLOWER_BASIC_AUTH" in r.stderr


def test_flower_requires_basic_auth_everywhere_but_healthcheck(flower):
    f, *_ = flower
    for path in ("/", "/api/tasks", "/api/workers", "/api/queues/length", "/metrics"):
        assert f.get(path, auth=None).status_code == 401, path
        assert f.get(path, auth=(AUTH[0], "wrong")).status_code == 401, path
    assert f.get("/api/tasks").status_code == 200
    assert f.get("/api/tasks", auth=("bob", "other-pass")).status_code == 200  # 2nd user
    assert f.get("/").status_code == 200


def test_flower_metrics_are_prometheus_text(flower):
    f, *_ = flower
    r = f.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families

    names = {fam.name for fam in text_string_to_metric_families(r.text)}
    assert {"flower_events", "flower_task_runtime_seconds", "flower_worker_online"} <= names


def test_flower_lists_every_modality_queue_with_its_length(flower):
    """With no worker running, Flower still shows all three queues and their
    backlogs (it would otherwise list only the queues of workers it knows)."""
    f, url, *_ = flower
    redis.Redis.from_url(url).delete("text", "image", "audio")
    app = producer_app(Settings(broker_url=url))
    send_jobs(app, [(f"img-{i}", "image") for i in range(3)] + [("aud-0", "audio")])
    r = f.get("/api/queues/length")
    assert r.status_code == 200
    got = {q["name"]: q["messages"] for q in r.json()["active_queues"]}
    assert got == {"text": 0, "image": 3, "audio": 1}


def test_a_job_run_by_a_real_worker_shows_in_flower(flower, start_worker):
    f, url, db, env = flower
    start_worker("text", env, concurrency=2)
    client = Client(broker_url=url, database_url=db)
    try:
        job = client.submit_text("The striker scored twice.", task="classify",
                                 labels=["sport", "finance"], top_k=1)
        assert client.wait([job], timeout=120)[0]["status"] == "succeeded"
    finally:
        client.close()
    task = _flower_task(f, job)
    assert task["name"] == "mmq.run_job" and task["worker"].startswith("text-")
    summary = ast.literal_eval(task["result"])  # Flower shows the result's repr
    assert summary["job"] == job and summary["status"] == "succeeded"
    assert summary["modality"] == "text" and summary["top"][0] == "sport"
    _task_list_shows_modality_and_summary(f, job)
    metrics = f.get("/metrics").text
    assert 'flower_events_total{task="mmq.run_job",type="task-succeeded"' in metrics
    # Now that Flower knows a worker, it would list only that worker's queue; the
    # image and audio backlogs must stay visible.
    workers = f.get("/api/workers", params={"refresh": "true"}).json()
    assert [[q["name"] for q in w["active_queues"]] for w in workers.values()] == [["text"]]
    names = [q["name"] for q in f.get("/api/queues/length").json()["active_queues"]]
    assert names == ["audio", "image", "text"]
    # mmq top sees the same worker through its own broadcast, and the job in SQL.
    settings = Settings(broker_url=url, database_url=db)
    engine = store.make_engine(db)
    try:
        frame = collect(settings, store.session_factory(engine), producer_app(settings),
                        window_s=3600)
    finally:
        engine.dispose()
    assert [(w.modality, w.jobs, w.messages) for w in frame.workers] == [("text", 1, 1)]
    assert frame.workers[0].name == task["worker"]
    assert frame.counts == {("text", "succeeded"): 1} and frame.rates["text"] > 0


def test_mmq_top_counts_a_workers_jobs_not_its_messages(broker_url, tmp_path, start_worker):
    """Six jobs submitted together travel in one run_jobs message: Celery's count (what
    `mmq top` showed as "processed") says 1; the worker's own count says 6."""
    db = f"sqlite:///{tmp_path / 'mmq.db'}"
    start_worker("text", service_env(broker_url, db), concurrency=2)
    client = Client(broker_url=broker_url, database_url=db)
    try:
        ids = client.submit_many([{"modality": "text", "input": f"sentence {i}"}
                                  for i in range(6)])
        res = client.wait(ids, timeout=120, with_embedding=False)
        assert [r["status"] for r in res] == ["succeeded"] * 6
    finally:
        client.close()
    settings = Settings(broker_url=broker_url, database_url=db)
    engine = store.make_engine(db)
    app = producer_app(settings)
    try:
        end = time.monotonic() + 30
        while True:  # the model process's metrics reach the worker through a pipe
            frame = collect(settings, store.session_factory(engine), app, window_s=60)
            got = [(w.jobs, w.messages) for w in frame.workers or []]
            if got == [(6, 1)] or time.monotonic() > end:
                break
            time.sleep(0.2)
    finally:
        engine.dispose()
    assert got == [(6, 1)]
    row = next(line for line in render(frame, settings).splitlines() if "text-" in line
               and "messages" in line)
    assert "jobs 6 (1 messages)" in row


def _task_list_shows_modality_and_summary(f: FlowerProcess, job: str) -> None:
    """Flower's task list as an operator sees it, in headless Chromium: a Modality and a
    Summary column (producer/ops/flower.py's TASKS_COLUMNS), filled for the job."""
    import base64

    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chrome(width=1600)
    try:
        auth = base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
        driver.execute_cdp_cmd("Network.enable", {})  # basic auth on every request
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                               {"headers": {"Authorization": f"Basic {auth}"}})
        driver.get(f"{f.url}/tasks")
        # DataTables copies the header into a scrolling one: read the server's own.
        headers = [(th.get_attribute("data-column"), th.get_attribute("textContent").strip())
                   for th in driver.find_elements(By.CSS_SELECTOR, "#tasks-table thead th")]
        assert headers == [("name", "Name"), ("uuid", "UUID"), ("state", "State"),
                           ("kwargs", "Modality"), ("result", "Summary"),
                           ("received", "Received"), ("runtime", "Runtime"),
                           ("worker", "Worker")], headers

        def row_text(d):  # the rows are drawn by DataTables from /tasks/datatable
            try:
                rows = d.find_elements(By.ID, job)
                return rows[0].text if rows else False
            except StaleElementReferenceException:
                return False

        text = WebDriverWait(driver, 60, poll_frequency=0.3).until(row_text, "task row")
        assert "succeeded · top: sport" in text and "SUCCESS" in text, text
        cells = [td.get_attribute("textContent").strip()
                 for td in driver.find_elements(By.CSS_SELECTOR, f"tr[id='{job}'] td")]
        assert cells[3] == "text", cells  # the Modality column alone
        screenshot(driver, "flower", "tasks")
    finally:
        driver.quit()


def _flower_task(f: FlowerProcess, job: str, timeout: float = 60) -> dict:
    """Events reach Flower a moment after the store says succeeded; poll for them."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        task = f.get("/api/tasks").json().get(job)
        if task and task.get("state") == "SUCCESS":
            return task
        time.sleep(0.3)
    raise AssertionError(f"job {job} never reached Flower: {f.get('/api/tasks').json()}")


# -- mmq top -------------------------------------------------------------------------

@pytest.fixture
def top_store(broker_url, tmp_path):
    """A real Redis with messages waiting and a SQLite store with known rows."""
    url = broker_url
    db = f"sqlite:///{tmp_path / 'top.db'}"
    upgrade(db)
    engine = store.make_engine(db)
    sessions = store.session_factory(engine)
    now = store.utcnow()
    with sessions.begin() as s:
        for i in range(6):  # succeeded just now: they count towards jobs/s
            j = store.create_job(session=s, modality="text", task="embed", text=f"t{i}",
                                 owner="alice" if i < 2 else None)
            j.status, j.finished_at = "succeeded", now
        old = store.create_job(session=s, modality="image", task="embed", payload=b"x")
        old.status, old.finished_at = "succeeded", now - timedelta(hours=3)  # outside
        for i, mod in enumerate(["audio", "image"]):
            j = store.create_job(session=s, modality=mod, task="embed", payload=b"y",
                                 job_id=f"failed-{mod}", owner="bob" if mod == "image" else None)
            j.status, j.error = "failed", f"cannot decode {mod} payload"
            j.finished_at = now - timedelta(minutes=10 - i)  # image failed last
        store.create_job(session=s, modality="audio", task="embed", payload=b"z", owner="alice")
    send_jobs(producer_app(Settings(broker_url=url)),
              [(f"t-{i}", "text") for i in range(4)] + [("a-0", "audio")])
    yield Settings(broker_url=url, database_url=db), sessions
    engine.dispose()


def test_top_collects_queues_rates_counts_and_failures(top_store):
    settings, sessions = top_store
    frame = collect(settings, sessions, producer_app(settings), window_s=3600)
    assert frame.problems == []
    assert frame.depths == {"text": 4, "image": 0, "audio": 1}
    assert frame.workers == []
    assert frame.rates == {"text": pytest.approx(6 / 3600)}
    assert frame.counts == {("text", "succeeded"): 6, ("image", "succeeded"): 1,
                            ("audio", "failed"): 1, ("image", "failed"): 1,
                            ("audio", "queued"): 1}
    assert frame.owners == {"alice": {"queued": 1, "running": 0, "finished": 2},
                            "bob": {"queued": 0, "running": 0, "finished": 1},
                            None: {"queued": 0, "running": 0, "finished": 6}}
    assert [(x["id"], x["error"]) for x in frame.failures] == [
        ("failed-image", "cannot decode image payload"),
        ("failed-audio", "cannot decode audio payload")]
    # What the alert rules watch: no lease is live, and one audio job waits for nobody.
    assert {m: (s.live_workers, s.queued) for m, s in frame.slo.items()} == {
        "text": (0, 0), "image": (0, 0), "audio": (0, 1)}
    assert frame.slo["audio"].oldest_queued_s < 600 and frame.slo["text"].oldest_queued_s is None
    assert frame.alerts == ["MmqNoLiveWorker: 1 audio jobs queued, no live audio worker"]


def test_top_marks_what_the_rules_would_alert_on(top_store):
    """Thresholds come from the rule file; a lower one there is a new mark here."""
    from producer.ops.rules import load_thresholds

    settings, sessions = top_store
    with sessions.begin() as s:
        store.renew_lease(session=s, worker="audio-1@h", modality="audio")
        for i in range(3):  # text: 3 failures of 9 finished in the last 10 minutes
            j = store.create_job(session=s, modality="text", task="embed", text=f"f{i}")
            j.status, j.finished_at = "failed", store.utcnow()
    t = load_thresholds()
    frame = collect(settings, sessions, producer_app(settings), window_s=60, thresholds=t)
    assert frame.slo["audio"].live_workers == 1 and frame.alerts == []  # 9 < min jobs
    strict = replace(t, failure_min_jobs=5, oldest_queued_s=0)
    frame = collect(settings, sessions, producer_app(settings), window_s=60, thresholds=strict)
    assert frame.alerts[0] == "MmqFailureRatioHigh: 33% of 9 finished text jobs failed (> 20%)"
    assert frame.alerts[1].startswith("MmqOldestQueuedJobTooOld: oldest queued audio job")
    assert len(frame.alerts) == 2
    assert "  ! MmqFailureRatioHigh" in render(frame, settings)


def test_top_once_prints_one_frame(top_store):
    settings, _ = top_store
    env = service_env(settings.broker_url, settings.database_url)
    r = subprocess.run([sys.executable, "-m", "producer.cli", "top", "--once", "--interval",
                        "3600"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()
            if line.startswith(("text ", "image ", "audio "))}  # the first table's rows
    # waiting, workers, jobs/s, then queued running succeeded failed cancelled
    assert rows["text"] == ["4", "0", "0.00", "0", "0", "6", "0", "0"]
    assert rows["image"] == ["0", "0", "0.00", "0", "0", "1", "1", "0"]
    assert rows["audio"] == ["1", "0", "0.00", "1", "0", "0", "1", "0"]
    assert "failed-image" in r.stdout and "cannot decode image payload" in r.stdout
    # Jobs per API key id, busiest first: queued, running, finished.
    lines = r.stdout.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("owners ")))
    assert lines[at].split() == ["owners", "queued", "running", "finished"]
    assert [line.split() for line in lines[at + 1:at + 4]] == [
        ["alice", "1", "0", "2"], ["(no", "key)", "0", "0", "6"], ["bob", "0", "0", "1"]]
    assert "\x1b[" not in r.stdout  # --once prints plain text
    slo = {line.split()[0]: line.split()[1:3] for line in lines
           if line.startswith(("  text ", "  image ", "  audio "))}
    assert slo["audio"][0] == "0" and slo["text"] == ["0", "-"]  # live leases, oldest queued
    assert "  ! MmqNoLiveWorker: 1 audio jobs queued, no live audio worker" in lines


def test_top_reports_a_broker_that_does_not_answer(top_store):
    settings, sessions = top_store
    dead = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    frame = collect(dead, sessions, producer_app(dead), window_s=60)
    assert frame.depths is None and frame.workers is None
    assert any(p.startswith("redis:") for p in frame.problems)
    assert frame.alerts[0] == "MmqBrokerDown: Redis does not answer"
    assert frame.counts is not None  # the store still answered
    text = render(frame, dead)
    text_row = next(line for line in text.splitlines() if line.startswith("text "))
    assert text_row.split()[1:3] == ["?", "?"] and "problems" in text
