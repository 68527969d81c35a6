"""Corrections through the API (``/v1/jobs/{id}/correction``), the results page's form,
the SDK and ``mmq train --from-corrections``'s checks, in process against a real Redis
(nobody consumes it) and a SQLite store: who may correct which job, which jobs take a
correction, and that training refuses too little data before it loads a model. The
store functions are tested on SQLite and PostgreSQL in tests/core/store; the whole loop
(correct in Chromium, train, promote, a new job gets the corrected label) in
tests/e2e/test_ui_browser.py."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient

from core import store
from core.config import Settings, get_settings
from core.jobs import JobResult
from core.store.corrections import CorrectionRefused
from core.training.corrections import export_corrections
from core.training.labelled import DataError
from producer import cli
from producer.api import create_app
from producer.sdk import Client
from tests.helpers import add_job

KEYS = {"alice": "alice-corr-key-1", "bob": "bob-corr-key-2", "root": "root-corr-key-3"}
ORIGIN = "https://testserver"  # the session cookie is Secure: httpx keeps it over https
RESULT = JobResult(embedding=np.zeros(4, "float32"), labels=[("b", 0.6), ("a", 0.4)])


@pytest.fixture(scope="module")
def app(new_broker, tmp_path_factory):
    db = f"sqlite:///{tmp_path_factory.mktemp('corrections') / 'mmq.db'}"
    s = Settings(broker_url=new_broker(), database_url=db,
                 api_keys=f"alice:{KEYS['alice']},bob:{KEYS['bob']}",
                 admin_keys=f"root:{KEYS['root']}")
    return create_app(s)


def api(app, who: str) -> TestClient:
    return TestClient(app, headers={"Authorization": f"Bearer {KEYS[who]}"})


def csrf(c: TestClient, path: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', c.get(path).text).group(1)


def done(app, owner: str | None, text: str = "the striker scored") -> str:
    return add_job(app, owner, text=text, result=RESULT)


def test_the_owner_corrects_through_the_api(app):
    job, other = done(app, "alice"), done(app, None)
    alice, bob, root = api(app, "alice"), api(app, "bob"), api(app, "root")
    r = alice.put(f"/v1/jobs/{job}/correction", json={"label": " a "})
    assert r.status_code == 200, r.text
    c = r.json()
    assert (c["label"], c["predicted"], c["corrected_by"], c["via"]) == ("a", "b", "alice",
                                                                          "api")
    first = c["corrected_at"]
    r = alice.put(f"/v1/jobs/{job}/correction", json={"label": "a label of my own"})
    assert r.json()["label"] == "a label of my own" and r.json()["corrected_at"] >= first
    assert alice.get(f"/v1/jobs/{job}/correction").json()["label"] == "a label of my own"
    # Another key's job is not found; an admin sees it but may not speak for its owner.
    assert bob.put(f"/v1/jobs/{job}/correction", json={"label": "b"}).status_code == 404
    assert bob.get(f"/v1/jobs/{job}/correction").status_code == 404
    r = root.put(f"/v1/jobs/{job}/correction", json={"label": "b"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    # A job made without a key (SDK, CLI) is the admin's to correct.
    r = root.put(f"/v1/jobs/{other}/correction", json={"label": "b"})
    assert r.status_code == 200 and r.json()["corrected_by"] == "root"
    assert alice.delete(f"/v1/jobs/{job}/correction").status_code == 204
    assert alice.get(f"/v1/jobs/{job}/correction").status_code == 404
    assert alice.delete(f"/v1/jobs/{job}/correction").status_code == 404


def test_jobs_that_cannot_be_corrected_get_a_clear_4xx(app):
    alice = api(app, "alice")
    queued = add_job(app, "alice", text="still waiting")
    failed = add_job(app, "alice", text="broken", status="failed", error="bad")
    with app.state.client.sessions.begin() as s:
        embed = store.create_job(session=s, modality="text", task="embed", text="x",
                                 owner="alice").id
    for job, why in ((queued, "is queued"), (failed, "is failed"), (embed, "embed job")):
        r = alice.put(f"/v1/jobs/{job}/correction", json={"label": "a"})
        assert r.status_code == 409 and why in r.json()["error"]["message"], r.text
    ok = done(app, "alice")
    for body, status in (({"label": ""}, 422), ({"label": "x" * 101}, 422), ({}, 422),
                         ({"label": 3}, 422), ({"label": "a", "extra": 1}, 422)):
        assert alice.put(f"/v1/jobs/{ok}/correction", json=body).status_code == status, body
    assert alice.put("/v1/jobs/not-an-id/correction", json={"label": "a"}).status_code == 404
    assert TestClient(app).put(f"/v1/jobs/{ok}/correction",
                               json={"label": "a"}).status_code == 401


def _page(app, who: str) -> TestClient:
    c = TestClient(app, base_url=ORIGIN)
    r = c.post("/ui/signin", data={"key": KEYS[who], "next": "/ui/jobs"},
               follow_redirects=False)
    assert r.status_code == 303
    return c


def test_the_owner_corrects_on_the_results_page(app):
    job = done(app, "alice", "a corrected <b>text</b>")
    alice = _page(app, "alice")
    page = alice.get(f"/ui/jobs/{job}").text
    assert 'id="correct-form"' in page
    assert re.findall(r'<option value="([^"]+)"', page) == ["a", "b"]
    token = csrf(alice, f"/ui/jobs/{job}")
    r = alice.post(f"/ui/jobs/{job}/correct", data={"csrf": token, "choice": "a"},
                   follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/ui/jobs/{job}?corrected=1"
    page = alice.get(r.headers["location"]).text
    assert "Corrected: the right label is &#39;a&#39;" in page
    assert "Right label: <strong>a</strong>" in page and "marked by\n    alice via ui" in page
    # A new label wins over the list; the list of jobs shows the correction.
    alice.post(f"/ui/jobs/{job}/correct",
               data={"csrf": token, "choice": "a", "new_label": "<i>poetry</i>"})
    rows = alice.get("/ui/jobs/rows").text
    assert "corrected</span> &lt;i&gt;poetry&lt;/i&gt;" in rows
    assert api(app, "alice").get(f"/v1/jobs/{job}/correction").json()["via"] == "ui"
    # Without the page's token: refused. Another key: no such job. Not finished: 409.
    r = alice.post(f"/ui/jobs/{job}/correct", data={"choice": "b"})
    assert r.status_code == 403
    bob = _page(app, "bob")
    r = bob.post(f"/ui/jobs/{job}/correct",
                 data={"csrf": csrf(bob, "/ui/jobs"), "choice": "b"})
    assert r.status_code == 404
    queued = add_job(app, "alice", text="waiting")
    assert 'id="correct-form"' not in alice.get(f"/ui/jobs/{queued}").text
    r = alice.post(f"/ui/jobs/{queued}/correct", data={"csrf": token, "choice": "a"})
    assert r.status_code == 409 and "is queued" in r.text
    r = alice.post(f"/ui/jobs/{job}/correct", data={"csrf": token, "choice": ""})
    assert r.status_code == 422
    # The admin sees alice's job but gets no form for it.
    root = _page(app, "root")
    assert 'id="correct-form"' not in root.get(f"/ui/jobs/{job}").text


@pytest.fixture
def sdk(app, tmp_path, monkeypatch):
    s = app.state.settings
    monkeypatch.setenv("MMQ_DATABASE_URL", s.database_url)
    monkeypatch.setenv("MMQ_BROKER_URL", s.broker_url)
    monkeypatch.setenv("MMQ_ADAPTERS_DIR", str(tmp_path / "adapters"))
    get_settings.cache_clear()
    c = Client()
    yield c
    c.close()
    get_settings.cache_clear()


def test_sdk_corrections_and_the_checks_before_training(app, sdk, tmp_path, capsys):
    job = done(app, "carol", "carol's text")
    with pytest.raises(CorrectionRefused, match="is queued"):
        sdk.correct(add_job(app, "carol", text="waiting"), "a")
    assert sdk.correct(job, "poetry", by="carol@laptop")["corrected_by"] == "carol@laptop"
    assert sdk.correction(job)["label"] == "poetry"
    out = tmp_path / "export"
    out.mkdir()
    found = export_corrections(sdk.sessions, "text", out, owner="carol")
    assert (found.count, found.labels) == (1, {"poetry": 1})
    (row,) = [json.loads(x) for x in (out / "labels.jsonl").read_text().splitlines()]
    assert row["label"] == "poetry" and (out / row["path"]).read_text() == "carol's text"
    # Image and audio inputs come from blobs, byte for byte.
    png = b"\x89PNG\r\n\x1a\n not decoded here"
    with sdk.sessions.begin() as s:
        img = store.create_job(session=s, modality="image", task="classify", payload=png,
                               params={"labels": ["a", "b"]}, owner="carol")
        img.status = "succeeded"
    sdk.correct(img.id, "b")
    (out / "img").mkdir()
    assert export_corrections(sdk.sessions, "image", out / "img").count == 1
    assert (out / "img" / f"{img.id}.bin").read_bytes() == png
    # One class, then nothing at all: refused before a model is loaded.
    with pytest.raises(DataError, match="only one class"):
        sdk.train_from_corrections("text", "from-carol", owner="carol", progress=False)
    with pytest.raises(DataError, match="no corrected audio classify jobs"):
        sdk.train_from_corrections("audio", "nothing", progress=False)
    assert cli.main(["train", "text", "--from-corrections", "--owner", "carol",
                     "--name", "c1", "-q"]) == 2
    assert "only one class" in capsys.readouterr().err
    assert cli.main(["train", "text", "--name", "c1"]) == 2
    assert cli.main(["train", "text", "--data", str(out), "--from-corrections",
                     "--name", "c1"]) == 2
    assert "either --data DIR or --from-corrections" in capsys.readouterr().err
    with sdk.sessions() as s:
        assert not store.versions.list_versions(session=s)
