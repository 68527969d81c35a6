"""The results page while the store is away, or fails: the page's own error page (HTML,
the page's headers), not the API's JSON, with the same status: 503 with Retry-After and
a sentence for a person when the database does not answer, 500 for any other database
error; never the SQL, the driver's message or the error's class on the page. The
outage is a store whose engine cannot connect (an SQLite file in a folder that does not
exist: OperationalError, "unable to open database file"), swapped in after signing in."""

from __future__ import annotations

import html
import re
import sqlite3

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError

from core import store
from core.config import Settings
from producer.api import create_app
from producer.ui import data as ui_data

KEY = "store-key-0123"
ORIGIN = "https://testserver"
DOWN = "The results store is not answering; try again in a moment."
SECRET = "my-secret-search-query"
NOT_SUBMITTED = ("The results store is not answering; nothing was submitted. Try again in "
                 "a moment.")
TYPED = {"text": "a note I typed before the outage", "task": "classify",
         "labels": "a cat, a dog", "top_k": "2"}


@pytest.fixture(scope="module")
def app(new_broker, tmp_path_factory):
    db = f"sqlite:///{tmp_path_factory.mktemp('ui-store') / 'mmq.db'}"
    return create_app(Settings(broker_url=new_broker(), database_url=db,
                               api_keys=f"alice:{KEY}"))


@pytest.fixture
def signed_in(app) -> TestClient:
    c = TestClient(app, base_url=ORIGIN, raise_server_exceptions=False)
    r = c.post("/ui/signin", data={"key": KEY, "next": "/ui/jobs"}, follow_redirects=False)
    assert r.status_code == 303
    return c


@pytest.fixture
def store_down(app, monkeypatch, tmp_path):
    """Every read and write of the page (sign-ins, jobs, submits) meets a dead store."""
    _kill_store(app, monkeypatch, tmp_path, sign_ins=True)


def _kill_store(app, monkeypatch, tmp_path, *, sign_ins: bool) -> None:
    """The store goes away: for the jobs, and for the sign-ins too if ``sign_ins``."""
    dead = store.session_factory(create_engine(f"sqlite:///{tmp_path / 'gone' / 'x.db'}"))
    monkeypatch.setattr(app.state.client, "sessions", dead)
    if sign_ins:
        monkeypatch.setattr(app.state.ui_sessions, "_db", dead)


def _csrf(c: TestClient) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', c.get("/ui/submit").text).group(1)


def _an_error_page(r, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("text/html"), r.headers
    assert "default-src 'self'" in r.headers["content-security-policy"]
    text = r.text
    assert text.lstrip().lower().startswith("<!doctype html>"), text[:200]
    for leak in ("[SQL", "SELECT", "INSERT", "sqlite", "OperationalError", "IntegrityError",
                 SECRET):
        assert leak not in text, (leak, text)
    return text


@pytest.mark.parametrize("method, path", [
    ("get", "/ui/jobs"), ("get", "/ui/jobs/rows"), ("get", f"/ui/search?q={SECRET}"),
    ("get", "/ui/jobs/0b3a0d5e-2f7e-4e63-9f43-6c3f8a8e7c11"), ("get", "/ui/submit"),
    ("post", "/ui/signin")])
def test_a_page_gets_an_html_503_while_the_store_is_down(signed_in, store_down, method,
                                                         path):
    kw = {"data": {"key": KEY, "next": "/ui/jobs"}} if method == "post" else {}
    r = getattr(signed_in, method)(path, **kw)
    text = _an_error_page(r, 503)
    assert DOWN in text, text
    assert int(r.headers["Retry-After"]) > 0
    assert 'href="/ui/signin"' not in text  # a sign-in would need the store too


def test_the_api_still_answers_json_while_the_store_is_down(signed_in, store_down):
    r = signed_in.get("/v1/jobs", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"


def test_any_other_database_error_on_a_page_is_an_html_500(signed_in, monkeypatch, caplog):
    def broken(*_a, **_kw):
        raise IntegrityError("SELECT * FROM jobs WHERE text = ?", (SECRET,),
                             sqlite3.IntegrityError("constraint failed"))

    monkeypatch.setattr(ui_data, "list_views", broken)
    with caplog.at_level("INFO", logger="mmq.api"):
        r = signed_in.get("/ui/jobs")
    text = _an_error_page(r, 500)
    assert "Something went wrong" in text, text
    logged = "\n".join(caplog.handler.format(rec) for rec in caplog.records)
    assert "IntegrityError: constraint failed" in logged and SECRET not in logged, logged



def _the_form_kept(r, token: str) -> None:
    """A 503 that is the submit form again, what was typed in it, and why."""
    text = _an_error_page(r, 503)
    assert int(r.headers["Retry-After"]) > 0
    assert NOT_SUBMITTED in text, text
    page = html.unescape(text)
    assert f">{TYPED['text']}</textarea>" in page, text
    assert f'value="{TYPED["labels"]}"' in page and f'value="{TYPED["top_k"]}"' in page
    assert '<option value="classify" selected>' in page, text
    assert f'name="csrf" value="{token}"' in page  # sent again as it is, once it answers


def test_a_submit_while_the_store_is_down_shows_the_form_again_with_what_was_typed(
        signed_in, app, monkeypatch, tmp_path):
    """The sign-in cannot be looked up either: the form came back as the error page,
    and what was typed was lost (a Redis outage already kept it). The cookie's
    signature and the form's CSRF token still prove the form is this sign-in's own."""
    token = _csrf(signed_in)
    _kill_store(app, monkeypatch, tmp_path, sign_ins=True)
    _the_form_kept(signed_in.post("/ui/submit", data={"csrf": token, **TYPED}), token)


def test_a_submit_whose_write_meets_the_outage_shows_the_form_again(signed_in, app,
                                                                    monkeypatch, tmp_path):
    """The sign-in was read, then the store went away before the jobs were written."""
    token = _csrf(signed_in)
    _kill_store(app, monkeypatch, tmp_path, sign_ins=False)
    _the_form_kept(signed_in.post("/ui/submit", data={"csrf": token, **TYPED}), token)


@pytest.mark.parametrize("csrf", ["", "x" * 43])
def test_a_submit_the_page_did_not_make_gets_no_form_while_the_store_is_down(
        signed_in, store_down, csrf):
    """Without the sign-in's CSRF token nothing is shown back: the store-down page."""
    r = signed_in.post("/ui/submit", data={"csrf": csrf, **TYPED})
    text = _an_error_page(r, 503)
    assert DOWN in text and TYPED["text"] not in text, text
