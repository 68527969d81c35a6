"""`mmq status`, `mmq wait` and `mmq cancel` on ids that name no job or a finished one,
on a SQLite store (no workers, no broker reached: jobs are ended in the store)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from core import store
from core.config import get_settings
from core.jobs import JobResult
from producer import cli
from producer.sdk import Client


@pytest.fixture
def finished(tmp_path, monkeypatch):
    """-> the id of a cancelled (finished) job in a fresh store the CLI's client uses."""
    monkeypatch.setenv("MMQ_DATABASE_URL", f"sqlite:///{tmp_path / 'mmq.db'}")
    monkeypatch.setenv("MMQ_BROKER_URL", "redis://127.0.0.1:1/0")  # never reached here
    get_settings.cache_clear()
    c = Client()
    with c.sessions.begin() as s:
        [(job_id, _)] = store.create_jobs(session=s, rows=[
            {"modality": "text", "task": "embed", "text": "hello"}])
        assert store.cancel_job(session=s, job_id=job_id)
    c.close()
    yield job_id
    get_settings.cache_clear()


def test_wait_on_an_unknown_id_fails_at_once_naming_it(finished, capsys):
    t0 = time.monotonic()
    rc = cli.main(["wait", finished, "no-such-job", "--timeout", "15"])
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert took < 10, f"waited {took:.1f} s for a job that does not exist"
    assert rc == 3  # not 4, the timeout's: nothing was waited for
    assert json.loads(err) == {"error": "not_found", "ids": ["no-such-job"],
                               "message": "no such job: no-such-job"}


def test_wait_on_known_ids_still_waits_and_prints_them(finished, capsys):
    assert cli.main(["wait", finished, "--timeout", "5"]) == 1  # cancelled: not succeeded
    assert json.loads(capsys.readouterr().out)[0]["status"] == "cancelled"


def test_status_of_an_unknown_id_says_it_does_not_exist(finished, capsys):
    assert cli.main(["status", "no-such-job"]) == 3
    out = capsys.readouterr()
    assert out.out == ""
    assert json.loads(out.err)["message"] == "no such job: no-such-job"
    # Several ids: the known ones printed in place, the unknown named.
    assert cli.main(["status", finished, "no-such-job"]) == 3
    out = capsys.readouterr()
    rows = json.loads(out.out)
    assert rows[0]["id"] == finished and rows[1] is None
    assert json.loads(out.err)["ids"] == ["no-such-job"]
    assert cli.main(["status", finished]) == 0


def test_the_sdk_names_the_ids_that_are_no_job(finished):
    c = Client()
    try:
        assert c.missing([finished, "a", finished, "b"]) == ["a", "b"]
        assert c.missing([finished], owner="someone-else") == [finished]
        assert c.missing([]) == []
    finally:
        c.close()


# -- cancel: one behaviour at the API, the SDK and the CLI ---------------------------------

@pytest.fixture
def ended(finished):
    """-> {status: job id} for a cancelled, a succeeded, a failed and a queued job."""
    c = Client()
    with c.sessions.begin() as s:
        (ok, _), (bad, _), (waiting, _) = store.create_jobs(session=s, rows=[
            {"modality": "text", "task": "embed", "text": t} for t in ("a", "b", "c")])
        store.start_jobs(session=s, job_ids=[ok], worker="w")
        assert store.finish_jobs(session=s, model_version="v", attempts={ok: 1},
                                 results={ok: JobResult(embedding=np.ones(4, np.float32))})
        assert store.fail_job(session=s, job_id=bad, error="boom", attempt=None)
    c.close()
    return {"cancelled": finished, "succeeded": ok, "failed": bad, "queued": waiting}


def test_the_sdk_cancel_of_a_cancelled_job_is_success_again(ended):
    """Cancelling twice is the outcome asked for, as the API's DELETE answers 200 again;
    only a job that succeeded or failed cannot be cancelled."""
    c = Client()
    try:
        assert c.cancel(ended["queued"]) is True
        assert c.cancel(ended["queued"]) is True  # again: still cancelled
        assert c.cancel(ended["cancelled"]) is True
        assert c.cancel(ended["succeeded"]) is False and c.cancel(ended["failed"]) is False
        assert c.cancel("no-such-job") is False
        assert c.cancel(ended["cancelled"], owner="someone-else") is False  # not theirs
        assert [c.get(ended[k])["status"] for k in ("succeeded", "failed")] == [
            "succeeded", "failed"]
    finally:
        c.close()


def test_cli_cancel_exits_as_the_api_answers(ended, capsys):
    """0 (the API's 200) once every job is cancelled, by this command or before; 1 (409)
    for a job that succeeded or failed; 3 (404) for an id that names no job."""
    assert cli.main(["cancel", ended["cancelled"]]) == 0  # exited 1
    assert json.loads(capsys.readouterr().out) == {ended["cancelled"]: "cancelled"}
    assert cli.main(["cancel", ended["queued"], ended["cancelled"]]) == 0
    capsys.readouterr()
    assert cli.main(["cancel", ended["cancelled"], ended["succeeded"], ended["failed"]]) == 1
    assert json.loads(capsys.readouterr().out) == {
        ended["cancelled"]: "cancelled",
        ended["succeeded"]: "not cancelled: it already succeeded",
        ended["failed"]: "not cancelled: it already failed"}
    assert cli.main(["cancel", ended["cancelled"], "no-such-job"]) == 3
    out = capsys.readouterr()
    assert json.loads(out.out) == {ended["cancelled"]: "cancelled", "no-such-job": None}
    assert json.loads(out.err)["ids"] == ["no-such-job"]
