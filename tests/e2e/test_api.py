"""The HTTP API end to end: `mmq api` (uvicorn) -> a real redis-server -> real
worker processes -> PostgreSQL, and back over HTTP.

A second, in-process app shares the database but sends to a Redis database no
worker consumes: jobs stay queued there, which makes cancel, long-poll timeouts
and backpressure (429) deterministic.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import uuid

import httpx
import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from core.config import Settings
from producer.ops.stack import EXAMPLES
from tests.helpers import Worker, free_port, pg_database, pg_drop, service_env, wait_http

KEY, OTHER_KEY = "test-key-1", "test-key-2"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_PAYLOAD = 200_000  # bytes per file: small, so a 413 needs no big upload
PNG = sorted(EXAMPLES.glob("*.png"))
WAV = sorted(EXAMPLES.glob("*.wav"))


@pytest.fixture(scope="module")
def pg_url():
    name = f"mmq_api_{uuid.uuid4().hex[:10]}"
    url = pg_database(name)
    yield url
    pg_drop(name)


@pytest.fixture(scope="module")
def api(new_broker, pg_url, tmp_path_factory):
    """The live stack: three workers and `mmq api` on a free port; an httpx client."""
    broker = new_broker()
    env = service_env(broker, pg_url, MMQ_API_KEYS=f"{KEY},{OTHER_KEY}",
                      MMQ_MAX_PAYLOAD_BYTES=MAX_PAYLOAD, MMQ_MAX_REQUEST_BYTES=4 * MAX_PAYLOAD,
                      MMQ_MAX_TEXT_CHARS=5000, MMQ_MAX_WAIT_S=30)
    logs = tmp_path_factory.mktemp("api-logs")
    subprocess.run([sys.executable, "-m", "producer.cli", "db", "upgrade"], env=env, check=True)
    workers = [Worker(m, env, logs / f"{m}.log") for m in ("text", "image", "audio")]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--port", str(port)],
                              env=env, stdout=open(logs / "api.log", "wb"),
                              stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for w in workers:
            w.wait_ready()
        wait_http(f"{base}/healthz", server, logs / "api.log")
        with httpx.Client(base_url=base, timeout=60) as http:
            yield http
    finally:
        server.terminate()
        server.wait(20)
        for w in workers:
            w.stop()


@pytest.fixture(scope="module")
def idle(new_broker, pg_url):
    """An in-process app on the same database whose queue no worker reads."""
    from producer.api import create_app

    s = Settings(broker_url=new_broker(), database_url=pg_url, api_keys=KEY,
                 max_queue_depth=3, max_wait_s=5)
    app = create_app(s)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    app.state.client.close()


def _wait_done(http: httpx.Client, job_id: str) -> dict:
    r = http.get(f"/v1/jobs/{job_id}/wait", params={"timeout": 30}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["status"] in ("succeeded", "failed", "cancelled"), r.json()
    return r.json()


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and err["code"] == code and err["message"], err
    return err


# -- each modality, long-polled to its result --------------------------------------------------

def test_text_classify_over_http(api):
    r = api.post("/v1/jobs", headers=AUTH, json={
        "text": "The striker scored twice and the home side won the cup.",
        "task": "classify", "labels": ["sport", "finance", "weather"], "top_k": 2})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["Location"] == f"/v1/jobs/{job_id}" == r.json()["location"]
    job = _wait_done(api, job_id)
    assert job["status"] == "succeeded", job
    assert job["prediction"]["labels"][0][0] == "sport"
    assert len(job["prediction"]["labels"]) == 2
    assert job["timings"]["total_s"] >= job["timings"]["run_s"] >= 0


def test_text_embedding_is_unit_length(api):
    job_id = api.post("/v1/jobs", headers=AUTH, json={"text": "a short sentence"}).json()["id"]
    pred = _wait_done(api, job_id)["prediction"]
    v = np.asarray(pred["embedding"])
    assert v.shape == (pred["dim"],) and abs(np.linalg.norm(v) - 1) < 1e-4
    slim = api.get(f"/v1/jobs/{job_id}", params={"embedding": "false"}, headers=AUTH).json()
    assert slim["prediction"]["embedding"] is None and slim["prediction"]["dim"] == pred["dim"]


def test_image_and_audio_uploads(api):
    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    ids = {}
    # modality found by decoding, not by the file name; photo-cat.jpg: the ImageNet tower
    for path in [EXAMPLES / "photo-cat.jpg"] + WAV[:1]:
        r = api.post("/v1/jobs", headers=AUTH,
                     files={"file": ("upload.bin", path.read_bytes(), "text/plain")},
                     data={"task": "classify",
                           "labels": ",".join(digits + ["yes", "stop", "cat"])})
        assert r.status_code == 202, r.text
        ids[path.name] = r.json()["id"]
    for name, job_id in ids.items():
        job = _wait_done(api, job_id)
        assert job["status"] == "succeeded", job
        assert job["modality"] == ("image" if name.endswith(".jpg") else "audio")
        assert job["prediction"]["labels"][0][0] == name.split("-")[1].split(".")[0]


def test_batch_multipart_and_base64_json(api):
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in PNG]
    r = api.post("/v1/jobs:batch", headers=AUTH, files=files, data={"modality": "image"})
    assert r.status_code == 202, r.text
    ids = [j["id"] for j in r.json()["jobs"]]
    assert len(ids) == len(PNG) and r.json()["replayed"] is False
    b64 = base64.b64encode(WAV[0].read_bytes()).decode()
    r = api.post("/v1/jobs:batch", headers=AUTH, json={"items": [
        {"modality": "audio", "data_base64": b64}, {"text": "and a sentence"}]})
    assert r.status_code == 202, r.text
    ids += [j["id"] for j in r.json()["jobs"]]
    assert all(_wait_done(api, i)["status"] == "succeeded" for i in ids)


# -- listing, paging, cancelling, idempotency ----------------------------------------------------

def test_list_pages_cover_every_job_once(api):
    r = api.post("/v1/jobs:batch", headers=AUTH,
                 json={"items": [{"text": f"page test sentence {i}"} for i in range(7)]})
    mine = {j["id"] for j in r.json()["jobs"]}
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3, "modality": "text", **({"cursor": cursor} if cursor else {})}
        page = api.get("/v1/jobs", params=params, headers=AUTH).json()
        seen += [j["id"] for j in page["jobs"]]
        pages += 1
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) and mine <= set(seen) and pages >= 3
    created = [j["created_at"] for j in api.get("/v1/jobs", params={"limit": 50},
                                                headers=AUTH).json()["jobs"]]
    assert created == sorted(created, reverse=True)
    for i in mine:
        _wait_done(api, i)
    done = api.get("/v1/jobs", params={"status": "succeeded", "limit": 1000},
                   headers=AUTH).json()["jobs"]
    assert mine <= {j["id"] for j in done} and all(j["status"] == "succeeded" for j in done)


def test_cancel_queued_job_and_refuse_finished(api, idle):
    queued = idle.post("/v1/jobs", headers=AUTH, json={"text": "never run"}).json()["id"]
    r = api.delete(f"/v1/jobs/{queued}", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert api.delete(f"/v1/jobs/{queued}", headers=AUTH).status_code == 200  # idempotent
    done = api.post("/v1/jobs", headers=AUTH, json={"text": "runs"}).json()["id"]
    _wait_done(api, done)
    _error(api.delete(f"/v1/jobs/{done}", headers=AUTH), 409, "not_cancellable")
    _error(api.delete(f"/v1/jobs/{uuid.uuid4()}", headers=AUTH), 404, "not_found")


def test_long_poll_returns_current_status_on_timeout(idle):
    job_id = idle.post("/v1/jobs", headers=AUTH, json={"text": "waits"}).json()["id"]
    r = idle.get(f"/v1/jobs/{job_id}/wait", params={"timeout": 0.3}, headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "queued"
    idle.delete(f"/v1/jobs/{job_id}", headers=AUTH)


def test_idempotency_key(api):
    body = {"text": "submitted twice by a retrying client"}
    h = {**AUTH, "Idempotency-Key": f"k-{uuid.uuid4()}"}
    first = api.post("/v1/jobs", headers=h, json=body)
    again = api.post("/v1/jobs", headers=h, json=body)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert first.headers["Idempotent-Replayed"] == "false"
    assert again.headers["Idempotent-Replayed"] == "true"
    _error(api.post("/v1/jobs", headers=h, json={"text": "something else"}), 409,
           "idempotency_conflict")
    other = api.post("/v1/jobs", json=body, headers={
        "Authorization": f"Bearer {OTHER_KEY}", "Idempotency-Key": h["Idempotency-Key"]})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


# -- errors and auth ------------------------------------------------------------------------------

def test_error_codes(api):
    big = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")  # noise does not compress: over 200 kB
    _error(api.post("/v1/jobs", headers=AUTH, files={"file": ("a.png", buf.getvalue())}),
           413, "payload_too_large")
    _error(api.post("/v1/jobs", headers={**AUTH, "Content-Type": "application/json"},
                    content=b" " * (4 * MAX_PAYLOAD + 1)), 413, "payload_too_large")
    _error(api.post("/v1/jobs", headers=AUTH, json={"text": "w " * 3000}), 413,
           "payload_too_large")
    _error(api.post("/v1/jobs", headers={**AUTH, "Content-Type": "text/plain"},
                    content=b"hello"), 415, "unsupported_media_type")
    corrupt = PNG[0].read_bytes()[:60] + b"\0" * 200  # a PNG signature, then garbage
    _error(api.post("/v1/jobs", headers=AUTH, files={"file": ("x.png", corrupt, "image/png")},
                    data={"modality": "image"}), 415, "unsupported_media_type")
    _error(api.post("/v1/jobs", headers=AUTH, files={"file": ("x.wav", b"RIFF....WAVE")}),
           415, "unsupported_media_type")
    silent = io.BytesIO()
    sf.write(silent, np.zeros(0), 16000, format="WAV")
    err = _error(api.post("/v1/jobs", headers=AUTH, files={"file": ("e.wav", silent.getvalue())},
                          data={"modality": "audio"}), 422, "invalid_input")
    assert "no samples" in err["message"]
    for body in ({"text": "   "}, {"text": "x", "task": "classify"}, {"text": 5},
                 {"modality": "video", "text": "x"}, {"text": "x", "top_k": 0},
                 {"text": "x", "colour": "red"}, {"modality": "image", "text": "x"}):
        _error(api.post("/v1/jobs", headers=AUTH, json=body), 422, "invalid_input")
    _error(api.post("/v1/jobs", headers={**AUTH, "Content-Type": "application/json"},
                    content=b"{not json"), 422, "invalid_input")
    _error(api.get("/v1/jobs", params={"cursor": "garbage"}, headers=AUTH), 422, "invalid_input")
    _error(api.get("/v1/jobs", params={"status": "sleeping"}, headers=AUTH), 422, "invalid_input")
    _error(api.get(f"/v1/jobs/{uuid.uuid4()}", headers=AUTH), 404, "not_found")
    _error(api.get("/v1/jobs/not-a-job-id", headers=AUTH), 404, "not_found")
    _error(api.get("/v2/nothing", headers=AUTH), 404, "not_found")


def test_backpressure_429_with_retry_after(idle):
    ids = []
    for i in range(3):
        r = idle.post("/v1/jobs", headers=AUTH, json={"text": f"fills the queue {i}"})
        if r.status_code == 429:  # earlier tests left jobs in this queue
            break
        ids.append(r.json()["id"])
    err = _error(r := idle.post("/v1/jobs", headers=AUTH, json={"text": "one too many"}), 429,
                 "queue_full")
    assert int(r.headers["Retry-After"]) > 0 and err["details"]["queue_depth"]["text"] >= 3
    # Bad input is refused as bad input, even while the queue is full.
    _error(idle.post("/v1/jobs", headers=AUTH, json={"text": "x\u0000y"}), 422, "invalid_input")


OPENAI_ROUTES = ("/v1/embeddings", "/v1/audio/transcriptions")


def test_every_v1_route_needs_a_valid_key(api):
    spec = api.get("/openapi.json").json()
    routes = [(m, p) for p, ops in spec["paths"].items() for m in ops if p.startswith("/v1")]
    assert len(routes) >= 6
    job = f"/v1/jobs/{uuid.uuid4()}"
    for method, path in routes:
        url = path.replace("/v1/jobs/{job_id}", job)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            r = api.request(method.upper(), url, headers=headers, json={"text": "x"})
            if path in OPENAI_ROUTES:  # OpenAI's error shape, so its client raises its own
                assert r.status_code == 401, r.text
                assert r.json()["error"]["code"] == "invalid_api_key", r.text
            else:
                _error(r, 401, "unauthorized")
            assert r.headers["WWW-Authenticate"] == "Bearer"
    assert api.get("/healthz").status_code == 200


def test_ready_metrics_and_docs(api):
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok",
                                                                   "database": "ok"}
    job_id = api.post("/v1/jobs", headers=AUTH, json={"text": "counted"}).json()["id"]
    _wait_done(api, job_id)
    text = api.get("/metrics").text
    assert 'mmq_jobs{modality="text",status="succeeded"}' in text
    assert 'mmq_queue_depth{modality="image"}' in text and "mmq_broker_up 1.0" in text
    count = [line for line in text.splitlines() if line.startswith(
        'mmq_job_latency_seconds_count{modality="text",status="succeeded"}')]
    assert count and float(count[0].split()[-1]) >= 1
    assert api.get("/docs").status_code == 200
    assert "/v1/jobs:batch" in api.get("/openapi.json").json()["paths"]


# -- Redis down --------------------------------------------------------------------------------

def test_submit_is_refused_with_503_while_redis_is_down(broker_url, pg_url):
    """The API reaches Redis through a proxy that the test takes down and up: while it is
    down a submit gets 503 with Retry-After (nothing the client did wrong, try again) and
    /readyz says why; once it is back the same submit is accepted."""
    from urllib.parse import urlsplit

    from bench.faults import TcpProxy
    from producer.api import create_app

    url = urlsplit(broker_url)
    proxy = TcpProxy(url.hostname, url.port)
    s = Settings(broker_url=f"redis://{proxy.address}{url.path}", database_url=pg_url,
                 api_keys=KEY)
    app = create_app(s)
    body = {"text": "sent while Redis comes and goes"}
    try:
        with TestClient(app, raise_server_exceptions=False) as http:
            assert http.post("/v1/jobs", headers=AUTH, json=body).status_code == 202
            proxy.down()
            err = _error(http.post("/v1/jobs", headers=AUTH, json=body), 503, "unavailable")
            assert "Redis" in err["message"]
            r = http.post("/v1/jobs", headers=AUTH, json=body)
            assert int(r.headers["Retry-After"]) > 0
            ready = http.get("/readyz")
            assert ready.status_code == 503, ready.text
            checks = ready.json()["error"]["details"]
            assert checks["redis"] != "ok" and checks["database"] == "ok"
            proxy.up()
            r = http.post("/v1/jobs", headers=AUTH, json=body)
            assert r.status_code == 202, r.text
            assert http.get("/readyz").status_code == 200
    finally:
        proxy.down()
        app.state.client.close()

