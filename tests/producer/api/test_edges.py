"""Bad input and admission at the HTTP API: the app with the real Client, served by
uvicorn on a free port, over a real redis-server and SQLite or PostgreSQL. No worker
reads the queue, so its length is exactly what admission let in."""

from __future__ import annotations

import base64
import faulthandler
import io
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from core import store
from core.broker.sender import queue_depths
from core.config import Settings
from core.jobs import JobResult
from producer.sdk import Client
from tests.helpers import big_png, cut_images, served_app, wav_claiming

KEY = "edge-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEPTH = 100


@contextmanager
def uvicorn_api(s: Settings):
    """The real app under uvicorn in a thread -> an httpx client (keep-alive) for it."""
    with served_app(s) as base, httpx.Client(base_url=base, headers=AUTH, timeout=120) as http:
        yield http


@pytest.fixture(scope="module")
def served(new_broker, database_url):
    """(httpx client, settings) for an API whose queue no worker consumes."""
    s = Settings(broker_url=new_broker(), database_url=database_url, api_keys=KEY,
                 max_queue_depth=DEPTH, max_labels=16, max_label_chars=40)
    with uvicorn_api(s) as http:
        yield http, s


def _error(r: httpx.Response, status: int, code: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and err["message"], err
    assert not code or err["code"] == code, err
    return err


def _flush(s: Settings) -> None:
    redis.Redis.from_url(s.broker_url).flushdb()


@pytest.fixture(autouse=True)
def empty_queues(served):
    """Each test starts with empty queues, so a full one never masks a 422 with a 429."""
    _flush(served[1])


def test_text_with_nul_is_422(served):
    http, _ = served
    err = _error(http.post("/v1/jobs", json={"text": "a\u0000b"}), 422, "invalid_input")
    assert "NUL" in err["message"]
    _error(http.post("/v1/jobs:batch", json={"items": [{"text": "ok"}, {"text": "\u0000"}]}),
           422, "invalid_input")
    _error(http.post("/v1/jobs", json={"text": "x", "task": "classify",
                                       "labels": ["a", "b\u0000"]}), 422, "invalid_input")


def test_text_with_nothing_visible_is_422_like_empty_text(served):
    """Zero-width characters and whitespace alone were queued and embedded as ""."""
    http, _ = served
    for text in ("", "\u200b", "\ufeff\n", " \u200c\u200d\u2060 "):
        err = _error(http.post("/v1/jobs", json={"text": text}), 422, "invalid_input")
        assert err["message"].startswith("item 0: text is empty"), err
    err = _error(http.post("/v1/jobs:batch", json={"items": [{"text": "ok"},
                                                             {"text": "\u200b"}]}),
                 422, "invalid_input")
    assert "no visible characters" in err["message"] and "U+200B" in err["message"], err
    r = http.post("/v1/embeddings", json={"input": ["ok", "\u200b\u200b"]}, timeout=10)
    assert r.status_code == 422 and "no visible characters" in r.text, r.text
    # Among visible characters they are text like any other.
    assert http.post("/v1/jobs", json={"text": "zero\u200bwidth"}).status_code == 202


def test_cancel_is_idempotent_and_refuses_jobs_that_succeeded_or_failed(served):
    """The DELETE that the SDK's ``cancel`` and ``mmq cancel`` agree with
    (tests/producer/cli/test_jobs_cli.py): 200 with the cancelled job, again for a job
    already cancelled; 409 once it succeeded or failed; 404 for no such job."""
    http, s = served
    ids = [http.post("/v1/jobs", json={"text": f"never run {i}"}).json()["id"]
           for i in range(3)]
    for _ in range(2):
        r = http.delete(f"/v1/jobs/{ids[0]}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    sdk = Client(settings=s)
    try:
        with sdk.sessions.begin() as sess:
            store.start_jobs(session=sess, job_ids=[ids[1]], worker="w")
            assert store.finish_jobs(session=sess, model_version="v", attempts={ids[1]: 1},
                                     results={ids[1]: JobResult(np.ones(4, np.float32))})
            assert store.fail_job(session=sess, job_id=ids[2], error="boom", attempt=None)
    finally:
        sdk.close()
    for job, status in ((ids[1], "succeeded"), (ids[2], "failed")):
        err = _error(http.delete(f"/v1/jobs/{job}"), 409, "not_cancellable")
        assert f"is {status}" in err["message"], err
        assert http.get(f"/v1/jobs/{job}").json()["status"] == status
    _error(http.delete(f"/v1/jobs/{uuid.uuid4()}"), 404, "not_found")


def test_version_names_with_nul_are_422_or_404(served):
    """They reached PostgreSQL, which cannot hold a NUL in text: a 500."""
    http, _ = served
    err = _error(http.post("/v1/jobs", json={"text": "a", "model_version": "a\u0000"}), 422,
                 "invalid_input")
    assert "model_version" in err["message"]
    r = http.post("/v1/embeddings", json={"input": "a", "model": "a\u0000"}, timeout=10)
    assert r.status_code == 422 and r.json()["error"]["param"] == "model", r.text
    _error(http.get("/v1/models/a%00b"), 404, "not_found")


def test_deeply_nested_json_is_422(served):
    http, _ = served
    for body in (b"[" * 100_000, b'{"text": ' + b"[" * 100_000, b'{"items": ' + b"[" * 50_000):
        err = _error(http.post("/v1/jobs:batch" if b"items" in body else "/v1/jobs",
                               content=body, headers={"Content-Type": "application/json"}),
                     422, "invalid_input")
        assert "nested" in err["message"]


@pytest.mark.parametrize("field,value", [
    ("top_k", 10**12), ("top_k", 0), ("timeout_s", 1e300), ("timeout_s", 8 * 86400),
    ("labels", [f"l{i}" for i in range(17)]), ("labels", ["a", "x" * 41]),
    ("labels", [f"l{i}" for i in range(10_000)])])
def test_json_bounds_are_the_sdks(served, field, value):
    http, _ = served
    body = {"text": "x", "task": "classify", "labels": ["a", "b"], field: value}
    err = _error(http.post("/v1/jobs", json=body), 422, "invalid_input")
    assert field.rstrip("s") in err["message"]


@pytest.mark.parametrize("field,value", [
    ("top_k", "2"), ("top_k", True), ("top_k", 1.0), ("timeout_s", "5"), ("timeout_s", True),
    ("webhook_embedding", "yes"), ("webhook_embedding", 1)])
def test_json_types_are_the_sdks(served, field, value):
    """JSON was validated in pydantic's lax mode: "2", true and 1.0 were stored as a
    top_k of 2, 1 and 1 (202) where the SDK and docs/pipeline.md refuse them."""
    http, _ = served
    body = {"text": "x", "task": "classify", "labels": ["a", "b"], field: value}
    err = _error(http.post("/v1/jobs", json=body), 422, "invalid_input")
    assert field in err["message"]
    err = _error(http.post("/v1/jobs:batch", json={"items": [body]}), 422, "invalid_input")
    assert field in err["message"]
    if field == "webhook_embedding":  # the batch's own
        _error(http.post("/v1/jobs:batch", json={"items": [{"text": "x"}], field: value}),
               422, "invalid_input")


def test_json_types_of_search_and_embeddings(served):
    """The same coercion on the other JSON bodies: a search's k, OpenAI's dimensions."""
    http, _ = served
    for k in ("2", 2.0, True):
        err = _error(http.post("/v1/search", json={"query": {"text": "a"}, "k": k}), 422,
                     "invalid_input")
        assert "k" in err["message"]
    for dims in ("384", 384.0):  # coerced, it queued a job and waited for a worker
        r = http.post("/v1/embeddings", json={"input": "a", "dimensions": dims}, timeout=10)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == "dimensions"


def test_form_bounds_are_the_sdks(served):
    http, _ = served
    wav = wav_claiming(16000)
    for data in ({"top_k": "five"}, {"top_k": str(10**12)}, {"timeout_s": "1e300"},
                 {"timeout_s": "soon"}, {"labels": ",".join(f"l{i}" for i in range(17))}):
        _error(http.post("/v1/jobs", files={"file": ("a.wav", wav)},
                         data={"task": "classify", "labels": "a,b", **data}), 422,
               "invalid_input")


@pytest.mark.parametrize("filters", [{"created_since": "0001-01-01T00:00:00+14:00"},
                                     {"created_until": "0001-01-01T00:00:00+01:00"},
                                     {"created_until": "9999-12-31T23:00:00-02:00"}])
def test_search_dates_out_of_range_are_422(served, filters):
    """A date with no UTC instant was a 500 (OverflowError); GET /v1/jobs?since= says 422."""
    http, _ = served
    (name, value), = filters.items()
    err = _error(http.post("/v1/search", json={"query": {"text": "a"}, "filters": filters}),
                 422, "invalid_input")
    assert name in err["message"]
    err = _error(http.post("/v1/search", files={"text": (None, "a"), name: (None, value)}),
                 422, "invalid_input")
    assert name in err["message"]


def test_upload_edges(served):
    http, s = served
    err = _error(http.post("/v1/jobs", files={"file": ("e.png", b"")}), 422, "invalid_input")
    assert "empty" in err["message"]
    tiny = wav_claiming(16000)
    err = _error(http.post("/v1/jobs:batch", files=[("files", (f"{i}.wav", tiny))
                                                    for i in range(s.max_batch_items + 1)]),
                 413, "payload_too_large")
    assert str(s.max_batch_items) in err["message"]
    bomb = io.BytesIO()  # a 1-bit PNG of 20000 x 20000 = 400 M pixels, a few kB of bytes
    Image.new("1", (20_000, 20_000)).save(bomb, format="PNG")
    for data in ({}, {"modality": "image"}):
        _error(http.post("/v1/jobs", files={"file": ("b.png", bomb.getvalue())}, data=data),
               413, "payload_too_large")
    err = _error(http.post("/v1/jobs", files={"file": ("f.wav", wav_claiming(2_000_000_000))}),
                 422, "invalid_input")
    assert "sample rate" in err["message"]


def test_undecodable_audio_is_415_with_a_reason_and_no_object_repr(served):
    """The message held soundfile's "Error opening <_io.BytesIO object at 0x...>"."""
    http, _ = served
    bad = {"not audio": b"plain bytes, no audio at all " * 3,
           "WAV without data": b"RIFF\x24\0\0\0WAVEjunk" + b"\0" * 40,
           "WAV cut short": wav_claiming(16000)[:4000]}
    for name, data in bad.items():
        answers = [http.post("/v1/jobs", files={"file": ("x.wav", data)},
                             data={"modality": "audio"}),
                   http.post("/v1/jobs", json={"modality": "audio", "data_base64":
                                               base64.b64encode(data).decode()})]
        for r in answers:
            err = _error(r, 415, "unsupported_media_type")
            assert "object at 0x" not in err["message"] and "<_io" not in err["message"]
            assert ("cut short" if name == "WAV cut short" else "expected WAV, FLAC") \
                in err["message"], err


def test_images_cut_short_or_over_the_pixel_limit_are_4xx(served):
    http, _ = served
    for data in ({}, {"modality": "image"}):
        for image in cut_images().values():
            _error(http.post("/v1/jobs", files={"file": ("i.img", image)}, data=data),
                   415, "unsupported_media_type")
        err = _error(http.post("/v1/jobs", files={"file": ("big.png", big_png())}, data=data),
                     413, "payload_too_large")
        assert "64000000 pixels" in err["message"]


def test_the_queue_limit_counts_jobs_when_they_share_messages(served):
    """Batch submits put 16 jobs in a message (MMQ_JOBS_PER_MESSAGE); the limit is on
    jobs. Three batches of 30 fill the queue to 90 of 100: a fourth is refused. Counted
    by messages (6 of them) it was admitted, and the queue held up to 16x its limit."""
    http, s = served
    items = [{"text": f"batched {i}"} for i in range(30)]
    for _ in range(3):
        assert http.post("/v1/jobs:batch", json={"items": items}).status_code == 202
    assert queue_depths(s, ["text"])["text"] == 90
    _error(http.post("/v1/jobs:batch", json={"items": items}), 429)
    assert queue_depths(s, ["text"])["text"] == 90
    assert http.post("/v1/jobs:batch", json={"items": items[:10]}).status_code == 202


def test_admission_is_atomic_under_concurrent_submits(served):
    """200 clients at once against a limit of 100: the queue never holds more than
    100 messages, and every submit that did not get in got 429 + Retry-After."""
    http, s = served
    _flush(s)
    peak, done = [0], threading.Event()
    watch = redis.Redis.from_url(s.broker_url)

    def watcher() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], queue_depths(s, ["text"], client=watch)["text"])

    def submit(i: int) -> httpx.Response:
        # A client (and connection) per submitter, as 200 real clients have: one httpx
        # pool shared by 200 threads over its 100 connections failed under load
        # (ReadTimeout in CI, "Bad file descriptor" here), on the client's side.
        with httpx.Client(base_url=http.base_url, headers=http.headers, timeout=120) as c:
            return c.post("/v1/jobs", json={"text": f"admission {i}"})

    t = threading.Thread(target=watcher)
    t.start()
    # The API runs in this process: should a request ever hang (one did once in CI,
    # a ReadTimeout after 120 s), every thread's stack shows where, before the client
    # gives up.
    faulthandler.dump_traceback_later(90)
    try:
        with ThreadPoolExecutor(200) as pool:
            responses = list(pool.map(submit, range(200)))
    finally:
        faulthandler.cancel_dump_traceback_later()
        done.set()
        t.join()
    codes = [r.status_code for r in responses]
    depth = queue_depths(s, ["text"], client=watch)["text"]
    assert set(codes) <= {202, 429}, [r.text for r in responses if r.status_code not in
                                      (202, 429)][:3]
    assert all(int(r.headers["Retry-After"]) > 0 for r in responses if r.status_code == 429)
    assert max(peak[0], depth) <= DEPTH
    # Every accepted job is in the queue. A submit counts twice for the moment between
    # pushing its message and releasing its reservation, so in a burst some may be
    # refused just below the limit (seen: 99 of 100 on a loaded machine; how many
    # depends on the scheduler), never above it.
    assert depth == codes.count(202) and depth >= DEPTH // 2
    assert watch.hlen("mmq:admit:text") == 0, "a reservation outlived its submit"


def test_requests_get_503_while_the_database_is_down(new_broker, request):
    """The API reaches PostgreSQL through a proxy taken down and up: submits and reads
    get 503 with Retry-After (an outage, not a bug: it was a 500, and the connection
    was dropped after it, so the client's next request failed too), /readyz says the
    database is the problem, and all works again once it is back."""
    from urllib.parse import urlsplit

    from bench.faults import TcpProxy
    from tests.helpers import pg_database, pg_drop

    database_url = pg_database(name := f"mmq_e2e_{uuid.uuid4().hex[:10]}")
    request.addfinalizer(lambda: pg_drop(name))

    where = urlsplit(database_url).netloc.split("@")[-1]
    host, port = where.split(":")
    proxy = TcpProxy(host, int(port))
    s = Settings(broker_url=new_broker(), api_keys=KEY,
                 database_url=database_url.replace(where, proxy.address))
    body = {"text": "sent while PostgreSQL comes and goes"}
    try:
        with uvicorn_api(s) as http:  # one keep-alive connection for every request
            job = http.post("/v1/jobs", json=body).json()["id"]
            proxy.down()
            for _ in range(2):
                for r in (http.post("/v1/jobs", json=body), http.get(f"/v1/jobs/{job}"),
                          http.get("/v1/jobs")):
                    _error(r, 503, "unavailable")
                    assert int(r.headers["Retry-After"]) > 0
                ready = http.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["error"]["details"]["database"] != "ok"
            proxy.up()
            assert http.get(f"/v1/jobs/{job}").status_code == 200
            assert http.post("/v1/jobs", json=body).status_code == 202
    finally:
        proxy.down()
