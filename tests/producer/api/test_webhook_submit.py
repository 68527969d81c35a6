"""webhook_url on every submit path (JSON, multipart form, batch, SDK, CLI), and the
URLs refused at submit: other schemes, hosts that resolve to private, loopback or
link-local addresses (unless MMQ_WEBHOOK_ALLOW_PRIVATE), and URLs no delivery could
ever reach (a NUL among them: a 422, not PostgreSQL's DataError as a 500). The app
under TestClient over a real redis-server and SQLite or PostgreSQL; no worker reads the
queue."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from core.config import Settings
from core.errors import InvalidInput
from producer.ops.stack import EXAMPLES
from tests.helpers import ROOT

KEY = "hook-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
PUBLIC = "http://93.184.215.14/hooks?x=1"  # an address literal: no DNS needed
REFUSED = {
    "ftp://93.184.215.14/x": "only http and https",
    "file:///etc/passwd": "only http and https",
    "http://127.0.0.1:8000/": "loopback",
    "http://localhost/": "loopback",
    "http://10.1.2.3/": "private",
    "http://192.168.0.10/": "private",
    "http://169.254.169.254/latest/meta-data": "link-local",
    "http://[::1]/": "loopback",
    "http://[::ffff:127.0.0.1]/": "loopback",
    "http://0.0.0.0/": "private",
    "https://user:pw@93.184.215.14/": "credentials",
    "not a url": "only http and https",
    "http://93.184.215.14/a b": "whitespace or control character",
    "http://93.184.215.14/\x01": "whitespace or control character",
    "http://93.184.215.14/\u0000": "whitespace or control character",
    "http://93.184.215.14/?q=\u0000": "whitespace or control character",
    "http://93.184.215.14:0/": "port must be a number in 1..65535",
    "http://a..b/": "not a valid host name",
}


@pytest.fixture(scope="module")
def settings(new_broker, database_url) -> Settings:
    return Settings(broker_url=new_broker(), database_url=database_url, api_keys=KEY,
                    webhook_secret=SECRET, webhook_deliver=False)


@pytest.fixture(scope="module")
def http(settings):
    from producer.api import create_app

    app = create_app(settings)
    with TestClient(app, headers=AUTH) as c:
        yield c
    app.state.client.close()


def test_private_and_other_urls_are_refused_with_422(http):
    for url, why in REFUSED.items():
        r = http.post("/v1/jobs", json={"text": "hi", "webhook_url": url})
        assert r.status_code == 422, (url, r.text)
        assert "webhook_url" in r.json()["error"]["message"], url
        assert why in r.json()["error"]["message"] or "resolves to" in r.json()["error"][
            "message"], (url, r.json())


def test_json_batch_and_form_store_the_url(http):
    one = http.post("/v1/jobs", json={"text": "hi", "webhook_url": PUBLIC,
                                      "webhook_embedding": True}).json()["id"]
    batch = http.post("/v1/jobs:batch", json={
        "webhook_url": PUBLIC, "items": [{"text": "a"}, {"text": "b", "webhook_url":
                                                          PUBLIC + "&own=1"}]}).json()
    png = sorted(EXAMPLES.glob("*.png"))[0].read_bytes()
    form = http.post("/v1/jobs", files={"file": ("d.png", png, "image/png")},
                     data={"webhook_url": PUBLIC, "webhook_embedding": "true"})
    assert form.status_code == 202, form.text
    urls = [http.get(f"/v1/jobs/{i}").json()["webhook_url"]
            for i in (one, *(j["id"] for j in batch["jobs"]), form.json()["id"])]
    assert urls == [PUBLIC, PUBLIC, PUBLIC + "&own=1", PUBLIC]
    bad = http.post("/v1/jobs", files={"file": ("d.png", png, "image/png")},
                    data={"webhook_url": "http://10.0.0.1/"})
    assert bad.status_code == 422 and "private" in bad.text
    assert http.get(f"/v1/jobs/{one}/webhooks").json() == {"webhooks": []}  # not ended yet


def test_a_cancelled_job_has_its_event_pending(http):
    job = http.post("/v1/jobs", json={"text": "hi", "webhook_url": PUBLIC}).json()["id"]
    assert http.delete(f"/v1/jobs/{job}").status_code == 200
    (hook,) = http.get(f"/v1/jobs/{job}/webhooks").json()["webhooks"]
    assert (hook["id"], hook["event"], hook["status"], hook["attempts"]) == (
        f"msg_{job}", "job.cancelled", "pending", 0)
    other = TestClient(http.app, headers={"Authorization": "Bearer nobody"})
    assert other.get(f"/v1/jobs/{job}/webhooks").status_code == 401


def test_sdk_and_cli(settings):
    from producer.sdk import Client

    c = Client(settings=settings)
    try:
        (a,) = c.submit_many([{"modality": "text", "input": "x"}], webhook_url=PUBLIC)
        b = c.submit_text("y", webhook_url=PUBLIC, webhook_embedding=True)
        assert c.get(a)["webhook_url"] == c.get(b)["webhook_url"] == PUBLIC
        with pytest.raises(InvalidInput, match="loopback"):
            c.submit_text("z", webhook_url="http://127.0.0.1/")
        off = Client(settings=settings.model_copy(update={"webhook_secret": ""}))
        with pytest.raises(InvalidInput, match="webhooks are off"):
            off.submit_text("z", webhook_url=PUBLIC)
        ok = Client(settings=settings.model_copy(update={"webhook_allow_private": True}))
        assert ok.get(ok.submit_text("z", webhook_url="http://127.0.0.1:9/"))["webhook_url"]
    finally:
        c.close()
    env = {**os.environ, "MMQ_BROKER_URL": settings.broker_url,
           "MMQ_DATABASE_URL": settings.database_url, "MMQ_WEBHOOK_SECRET": SECRET}
    run = lambda *a: subprocess.run([sys.executable, "-m", "producer.cli", "submit", "text",  # noqa: E731
                                     "hello", *a], env=env, cwd=ROOT, capture_output=True,
                                    text=True, timeout=120)
    good = run("--webhook-url", PUBLIC)
    assert good.returncode == 0, good.stderr
    bad = run("--webhook-url", "http://169.254.169.254/")
    assert bad.returncode != 0 and "link-local" in bad.stderr + bad.stdout
