"""A database error that is a bug rather than an outage (a 500) is logged as one brief
line (the error's class and the driver's message) and a traceback whose messages are
cut the same way: SQLAlchemy's own message carries the whole statement and its
parameters, which are a user's data (a submitted text, a search query). On the API's
own routes and on the OpenAI-compatible ones; the answers stay 500 (and 503 for an
outage). So is any other error that reaches a catch-all, whose chain may hold a
database error (raised while handling one), and what the app re-raises to the server."""

from __future__ import annotations

import sqlite3

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import IntegrityError, StatementError

from core import store
from core.config import Settings
from producer.api import create_app

KEY = "log-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
SECRET = "my-secret-diary-entry"  # a parameter: a user's text
STATEMENT = "INSERT INTO jobs (id, text) VALUES (?, ?)"


def _integrity_error(*_a, **_kw):
    """What SQLAlchemy raises for a bad write: its str() is the driver's message, then
    ``[SQL: ...]`` and ``[parameters: ...]``."""
    raise IntegrityError(STATEMENT, ("job-1", SECRET),
                         sqlite3.IntegrityError("UNIQUE constraint failed: jobs.id"))


def _statement_error(*_a, **_kw):
    """A SQLAlchemyError that is no DBAPIError (a parameter the driver could not bind):
    it carries the statement and parameters too."""
    raise StatementError("(builtins.TypeError) cannot bind", "SELECT * FROM jobs WHERE "
                         "text = ?", (SECRET,), TypeError("cannot bind"))


@pytest.fixture(scope="module")
def api(new_broker, tmp_path_factory):
    s = Settings(broker_url=new_broker(), api_keys=KEY,
                 database_url=f"sqlite:///{tmp_path_factory.mktemp('logs') / 'mmq.db'}")
    app = create_app(s)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    app.state.client.close()


def _logged(caplog) -> str:
    """Everything the records would print: messages and any tracebacks."""
    return "\n".join(caplog.handler.format(r) for r in caplog.records)


def _check(caplog, error: str, message: str, raiser) -> None:
    text = _logged(caplog)
    assert SECRET not in text, text
    assert "[SQL:" not in text and "[parameters:" not in text, text
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, text
    first = errors[0].getMessage().splitlines()[0]
    assert f"{error}: {message}" in first and len(first) < 400, first
    assert "Traceback (most recent call last)" in text  # where it happened is kept
    assert f"in {raiser.__name__}" in text, text


def test_a_database_error_on_an_api_route_is_logged_without_its_statement(api, monkeypatch,
                                                                          caplog):
    monkeypatch.setattr(api.app.state.client, "submit_valid", _integrity_error)
    with caplog.at_level("INFO", logger="mmq.api"):
        r = api.post("/v1/jobs", headers=AUTH, json={"text": SECRET})
    assert r.status_code == 500 and r.json()["error"]["message"] == \
        "internal error: IntegrityError"
    _check(caplog, "IntegrityError", "UNIQUE constraint failed: jobs.id", _integrity_error)


def test_a_statement_error_is_a_500_logged_without_its_statement(api, monkeypatch, caplog):
    monkeypatch.setattr(store, "list_jobs", _statement_error)
    with caplog.at_level("INFO", logger="mmq.api"):
        r = api.get("/v1/jobs", headers=AUTH)
    assert r.status_code == 500 and r.json()["error"]["message"] == \
        "internal error: StatementError"
    _check(caplog, "StatementError", "cannot bind", _statement_error)


@pytest.mark.parametrize("raiser, error, message", [
    (_integrity_error, "IntegrityError", "UNIQUE constraint failed: jobs.id"),
    (_statement_error, "StatementError", "cannot bind")])
def test_a_database_error_on_an_openai_route_is_logged_without_its_statement(
        api, monkeypatch, caplog, raiser, error, message):
    monkeypatch.setattr(api.app.state.client, "submit_valid", raiser)
    with caplog.at_level("INFO", logger="mmq.api"):
        r = api.post("/v1/embeddings", headers=AUTH, json={"input": SECRET})
    assert r.status_code == 500, r.text
    assert r.json()["error"]["message"] == f"internal error: {error}"
    _check(caplog, error, message, raiser)


def _chained_error(*_a, **_kw):
    """Not a database error, but raised while handling one: ``log.exception`` (and the
    server, which logs what the app re-raises) print the whole chain, SQL included."""
    try:
        _integrity_error()
    except IntegrityError:
        raise RuntimeError("the write failed")  # noqa: B904  (chained on purpose)


@pytest.mark.parametrize("path, body", [("/v1/jobs", {"text": SECRET}),
                                        ("/v1/embeddings", {"input": SECRET})])
def test_an_error_raised_while_handling_a_database_error_is_logged_without_its_statement(
        api, monkeypatch, caplog, path, body):
    """The catch-all (the app's, the OpenAI routes') logs the chain, briefly: the
    database error's class and driver message, never its statement."""
    monkeypatch.setattr(api.app.state.client, "submit_valid", _chained_error)
    with caplog.at_level("INFO", logger="mmq.api"):
        r = api.post(path, headers=AUTH, json=body)
    assert r.status_code == 500, r.text
    assert r.json()["error"]["message"] == "internal error: RuntimeError"
    _check(caplog, "RuntimeError", "the write failed", _chained_error)
    assert "IntegrityError: UNIQUE constraint failed: jobs.id" in _logged(caplog)


def test_what_the_app_re_raises_to_the_server_carries_no_statement(api, monkeypatch):
    """Starlette re-raises what reached the catch-all, after answering, and uvicorn logs
    it whole ("Exception in ASGI application"): that error must not bring the database
    error's statement along through its chain."""
    import traceback

    monkeypatch.setattr(api.app.state.client, "submit_valid", _chained_error)
    raising = TestClient(api.app, raise_server_exceptions=True)
    with pytest.raises(RuntimeError) as raised:
        raising.post("/v1/jobs", headers=AUTH, json={"text": SECRET})
    printed = "".join(traceback.format_exception(raised.value))
    assert SECRET not in printed and "[SQL:" not in printed, printed
    assert "RuntimeError: the write failed" in printed


def test_a_database_error_in_an_event_stream_is_logged_without_its_statement(
        api, monkeypatch, caplog):
    """A stream's status query fails after its first event: the response has started,
    so Starlette wraps the error in a RuntimeError that reaches the catch-all (and then
    the server), the database error chained to it."""
    job = api.post("/v1/jobs", headers=AUTH, json={"text": "hello"}).json()["id"]
    real, calls = store.job_states, []

    def failing_later(*a, **kw):
        calls.append(1)
        if len(calls) > 1:
            _statement_error()
        return real(*a, **kw)

    monkeypatch.setattr(store, "job_states", failing_later)
    with caplog.at_level("INFO", logger="mmq.api"):
        with api.stream("GET", f"/v1/jobs/{job}/events", headers=AUTH) as r:
            r.read()
    assert len(calls) == 2  # the first query answered, the second failed
    text = _logged(caplog)
    assert SECRET not in text and "[SQL:" not in text, text
    assert "StatementError: cannot bind" in text, text
