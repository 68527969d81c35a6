"""Search end to end: `mmq api` (uvicorn) -> a real redis-server -> real text and image
worker processes -> SQLite, and back: jobs submitted over HTTP are found by a text
query, an uploaded image, the SDK and the CLI; keys see only their own jobs; query
jobs are never results; bad queries are 4xx."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from core.precision import untagged
from producer.ops.stack import EXAMPLES
from tests.helpers import Worker, free_port, service_env, wait_http

ALICE, BOB, ADMIN = "alice-secret", "bob-secret", "ops-secret"
CAT_PHOTO = EXAMPLES / "photo-cat.jpg"
DIGITS = sorted(EXAMPLES.glob("digit-*.png"))
TEXTS = {
    "cat": "a cat sleeping on the sofa in the sun",
    "markets": "stock markets fell sharply after the central bank raised rates",
    "weather": "heavy rain and strong winds are expected tomorrow",
    "football": "the striker scored twice and the home side won the cup",
}


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def stack(new_broker, tmp_path_factory):
    """Text and image workers and `mmq api` on one SQLite store; the jobs of the
    tests below submitted once (alice: texts and images; bob: one text)."""
    d = tmp_path_factory.mktemp("search")
    db = f"sqlite:///{d / 'mmq.db'}"
    env = service_env(new_broker(), db, MMQ_API_KEYS=f"alice:{ALICE},bob:{BOB}",
                      MMQ_ADMIN_KEYS=f"ops:{ADMIN}", MMQ_MAX_TEXT_CHARS=2000,
                      MMQ_SEARCH_REFRESH_S=0)
    subprocess.run([sys.executable, "-m", "producer.cli", "db", "upgrade"], env=env, check=True)
    workers = [Worker(m, env, d / f"{m}.log") for m in ("text", "image")]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--port", str(port)],
                              env=env, stdout=open(d / "api.log", "wb"),
                              stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for w in workers:
            w.wait_ready()
        wait_http(f"{base}/healthz", server, d / "api.log")
        with httpx.Client(base_url=base, timeout=60) as http:
            jobs = _submit_all(http)
            yield http, env, jobs
    finally:
        server.terminate()
        server.wait(20)
        for w in workers:
            w.stop()


def _submit_all(http: httpx.Client) -> dict[str, str]:
    jobs = {}
    for name, text in TEXTS.items():
        jobs[name] = http.post("/v1/jobs", headers=auth(ALICE), json={"text": text}).json()["id"]
    for path in [CAT_PHOTO, *DIGITS]:
        r = http.post("/v1/jobs", headers=auth(ALICE), files={"file": path.read_bytes()})
        jobs[path.stem] = r.json()["id"]
    jobs["bob"] = http.post("/v1/jobs", headers=auth(BOB),
                            json={"text": "my cat knocked a glass off the table"}).json()["id"]
    for name, job_id in jobs.items():
        key = BOB if name == "bob" else ALICE
        r = http.get(f"/v1/jobs/{job_id}/wait", params={"timeout": 60}, headers=auth(key))
        assert r.json()["status"] == "succeeded", (name, r.text)
    return jobs


def search(http: httpx.Client, key: str, query: dict, k: int = 10, **filters) -> dict:
    r = http.post("/v1/search", headers=auth(key),
                  json={"query": query, "k": k, "filters": filters})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_text_query_finds_the_cat_first_in_any_modality(stack):
    http, _, jobs = stack
    out = search(http, ALICE, {"text": "a cat"})
    ids = [h["id"] for h in out["results"]]
    assert ids[0] == jobs["cat"], out["results"][:3]
    assert set(ids) == {jobs[n] for n in jobs if n != "bob"}  # alice's jobs, no query jobs
    top = out["results"][0]
    assert top["modality"] == "text" and top["task"] == "embed"
    assert top["text"].startswith("a cat sleeping") and "a cat sleeping" in top["summary"]
    assert 0 < top["score"] <= 1 and top["created_at"] and top["model_version"]
    scores = [h["score"] for h in out["results"]]
    assert scores == sorted(scores, reverse=True)
    assert out["query"]["modality"] == "text" and out["method"] == "exact"
    # One space for every precision mode: the speech tower's auto tag (bf16 on CPUs with
    # native bf16) rides on the model version, not on the space.
    assert untagged(out["query"]["model_version"]) == untagged(top["model_version"])
    # Across modalities: among the images, the photograph of a cat comes first.
    images = search(http, ALICE, {"text": "a cat"}, modality="image")["results"]
    assert [h["modality"] for h in images] == ["image"] * 4
    assert images[0]["id"] == jobs["photo-cat"]


def test_an_image_query_by_upload_and_base64(stack):
    http, _, jobs = stack
    r = http.post("/v1/search", headers=auth(ALICE), files={"file": CAT_PHOTO.read_bytes()},
                  data={"k": "3", "modality": "image"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["query"]["modality"] == "image"
    assert out["results"][0]["id"] == jobs["photo-cat"]
    assert out["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)  # the same photo
    b64 = base64.b64encode(CAT_PHOTO.read_bytes()).decode()
    texts = search(http, ALICE, {"data_base64": b64}, k=1, modality="text")["results"]
    assert texts[0]["id"] == jobs["cat"]  # the photo finds the sentence about a cat


def test_keys_see_only_their_own_jobs_and_admins_all(stack):
    http, _, jobs = stack
    bob = search(http, BOB, {"text": "a cat"})["results"]
    assert [h["id"] for h in bob] == [jobs["bob"]]
    everyone = {h["id"] for h in search(http, ADMIN, {"text": "a cat"}, k=100)["results"]}
    assert everyone == set(jobs.values())  # still no query jobs


def test_query_jobs_are_marked_and_never_results(stack):
    http, _, jobs = stack
    out = search(http, ALICE, {"text": "a cat"}, k=100)
    qjob = http.get(f"/v1/jobs/{out['query']['job_id']}", headers=auth(ALICE)).json()
    assert qjob["params"] == {"search_query": True} and qjob["owner"] == "alice"
    assert out["query"]["job_id"] not in {h["id"] for h in out["results"]}
    assert len(out["results"]) == len(jobs) - 1


def test_sdk_and_cli_search(stack):
    _, env, jobs = stack
    from producer.sdk import Client

    c = Client(env["MMQ_BROKER_URL"], env["MMQ_DATABASE_URL"])
    try:
        hits = c.search("a cat", k=3, modality="image")
        assert hits[0]["id"] == jobs["photo-cat"]
        assert set(hits[0]) >= {"id", "modality", "task", "score", "summary", "created_at"}
        assert c.search(Path(CAT_PHOTO), k=1)[0]["id"] == jobs["photo-cat"]
        assert c.search("a cat", owner="bob")[0]["id"] == jobs["bob"]
    finally:
        c.close()
    out = subprocess.run([sys.executable, "-m", "producer.cli", "search", "a cat",
                          "--modality", "image", "-k", "2", "--json"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["id"] == jobs["photo-cat"]


@pytest.mark.parametrize("body, status", [
    ({"query": {"text": "   "}}, 422),  # blank text, as a job
    ({"query": {"text": "x" * 2001}}, 413),  # over MMQ_MAX_TEXT_CHARS
    ({"query": {"text": "a\x00b"}}, 422),
    ({"query": {}}, 422),
    ({"query": {"text": "a", "data_base64": "aGk="}}, 422),
    ({"query": {"data_base64": "not base64!"}}, 422),
    ({"query": {"data_base64": base64.b64encode(b"neither image nor sound").decode()}}, 415),
    ({"query": {"text": "a cat"}, "k": 0}, 422),
    ({"query": {"text": "a cat"}, "k": "ten"}, 422),
    ({"query": {"text": "a cat"}, "filters": {"modality": "video"}}, 422),
    ({"query": {"text": "a cat"}, "filters": {"colour": "red"}}, 422),
    ({"query": {"text": "a cat"}, "filters": {"created_since": "yesterday"}}, 422),
])
def test_bad_queries_are_4xx(stack, body, status):
    http, _, _ = stack
    r = http.post("/v1/search", headers=auth(ALICE), json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["status"] == status


def test_search_needs_a_key_and_a_known_media_type(stack):
    http, _, _ = stack
    assert http.post("/v1/search", json={"query": {"text": "a cat"}}).status_code == 401
    r = http.post("/v1/search", headers={**auth(ALICE), "Content-Type": "text/plain"},
                  content=b"a cat")
    assert r.status_code == 415
    r = http.post("/v1/search", headers=auth(ALICE), files={"file": b""})
    assert r.status_code == 422  # an empty upload


def test_no_worker_for_the_query_modality_is_503_at_once(stack):
    http, _, _ = stack  # this stack runs no audio worker
    wav = (EXAMPLES / "spoken-yes.wav").read_bytes()
    r = http.post("/v1/search", headers=auth(ALICE), files={"file": wav})
    assert r.status_code == 503, r.text
    assert "no audio worker" in r.json()["error"]["message"]
    assert r.headers["Retry-After"]
