"""Corrections in the store, on SQLite and PostgreSQL: only a succeeded classify job
takes one, a new one replaces the old (stamped by the database's clock), and training
reads the corrected jobs of one modality (and owner) with their inputs."""

import pytest

from core import store
from core.jobs import JobStatus
from core.store import corrections
from core.store.corrections import CorrectionRefused
from core.store.tables import Prediction


def _job(s, *, task="classify", status="succeeded", modality="text", owner="alice",
         text="a goal in the last minute", payload=None, top="finance"):
    job = store.create_job(session=s, modality=modality, task=task,
                           params={"labels": ["sport", "finance"]} if task == "classify"
                           else {}, text=None if payload else text, payload=payload,
                           owner=owner)
    job.status = status
    s.flush()
    if status == JobStatus.SUCCEEDED.value and task == "classify":
        s.add(Prediction(job_id=job.id, labels=[[top, 0.7], ["sport", 0.3]]))
    return job.id


def test_a_correction_is_recorded_then_replaced(sessions):  # noqa: F811
    with sessions.begin() as s:
        jid = _job(s)
        before = store.db_time(session=s)
        c = corrections.set_correction(session=s, job_id=jid, label=" sport ", by="alice",
                                       via="ui")
        assert (c.label, c.predicted, c.corrected_by, c.via) == ("sport", "finance",
                                                                 "alice", "ui")
    with sessions.begin() as s:  # the latest word wins: one row, its author, its time
        corrections.set_correction(session=s, job_id=jid, label="a new label", by="admin",
                                   via="api")
    with sessions() as s:
        c = corrections.get_correction(session=s, job_id=jid)
        assert (c.label, c.corrected_by, c.via) == ("a new label", "admin", "api")
        d = c.as_dict()
        assert d["corrected_at"] >= before.isoformat()[:19]  # the database's clock
        assert list(corrections.corrections_by_job(session=s, job_ids=[jid, "x"])) == [jid]
        assert corrections.count_corrections(session=s) == {"text": 1}
    with sessions.begin() as s:
        assert corrections.delete_correction(session=s, job_id=jid)
        assert not corrections.delete_correction(session=s, job_id=jid)
    with sessions() as s:
        assert corrections.get_correction(session=s, job_id=jid) is None


@pytest.mark.parametrize("kind,what", [
    ({"task": "embed"}, "only classify jobs"),
    ({"status": "queued"}, "is queued"),
    ({"status": "running"}, "is running"),
    ({"status": "failed"}, "is failed"),
    ({"status": "cancelled"}, "is cancelled"),
])
def test_only_a_succeeded_classify_job_is_corrected(sessions, kind, what):  # noqa: F811
    with sessions.begin() as s:
        jid = _job(s, **kind)
    with sessions.begin() as s, pytest.raises(CorrectionRefused, match=what) as e:
        corrections.set_correction(session=s, job_id=jid, label="sport", by="a", via="ui")
    assert e.value.kind == CorrectionRefused.CONFLICT
    with sessions.begin() as s, pytest.raises(CorrectionRefused, match="no job") as e:
        corrections.set_correction(session=s, job_id="0" * 36, label="x", by="a", via="ui")
    assert e.value.kind == CorrectionRefused.NOT_FOUND
    with sessions.begin() as s, pytest.raises(ValueError, match="1-255"):
        corrections.set_correction(session=s, job_id=jid, label="  ", by="a", via="ui")


def test_training_reads_the_corrected_jobs_of_a_modality_and_owner(sessions):  # noqa: F811
    with sessions.begin() as s:
        a = _job(s, text="one")
        b = _job(s, text="two", owner="bob")
        _job(s, text="uncorrected")
        img = _job(s, modality="image", payload=b"\x89PNG fake bytes")
        for jid, label in ((a, "sport"), (b, "finance"), (img, "cat")):
            corrections.set_correction(session=s, job_id=jid, label=label, by="x", via="api")
    with sessions() as s:
        rows = list(corrections.corrected_jobs(session=s, modality="text"))
        assert sorted((r.text, r.label) for r in rows) == [("one", "sport"),
                                                           ("two", "finance")]
        assert [r.text for r in corrections.corrected_jobs(session=s, modality="text",
                                                           owner="bob")] == ["two"]
        (im,) = corrections.corrected_jobs(session=s, modality="image")
        assert store.get_blob(session=s, sha256=im.payload_sha256) == b"\x89PNG fake bytes"
        assert corrections.count_corrections(session=s) == {"text": 2, "image": 1}
        assert corrections.count_corrections(session=s, modality="text",
                                             owner="alice") == {"text": 1}
